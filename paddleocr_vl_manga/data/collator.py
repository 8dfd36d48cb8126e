"""Batches for PaddleOCR-VL: training batches (labels on the answer only) and generation prompts.

Training ids are generation ids. The generation prompt is rendered by the processor's chat template and
tokenized on its own, exactly as `generation_batch` feeds it to `generate`; the answer is tokenized on its own
and joined after it, followed by eos. The released tokenizer merges a space with the next Latin letter or
digit ("Assistant: OK" in one pass ends ":", "▁O", "K"), so tokenizing prompt + answer in one pass would
train on a sequence the model never sees at generation, where the prompt always ends in a standalone "▁".
Labels are -100 everywhere but on the answer and eos. A template that cannot render the release's generation
prompt raises PromptError.

The collator also does, on the CPU in the loader workers, two index computations the training step would
otherwise do on the GPU with host synchronisations: the multimodal rope position ids (`position_ids`, by
transformers' own get_rope_index) and the positions whose logits the loss reads (`logits_to_keep`, popped
by sft's answer_loss; a batch that goes to `model(**batch)` directly must drop that key).
"""

from __future__ import annotations

import json
import math
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from weakref import WeakKeyDictionary

import torch
from jinja2 import TemplateError
from tokenizers import Tokenizer
from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVLModel

try:  # the PIL image-processor module needs no torchvision; fall back for releases without it
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import smart_resize
except ImportError:
    from transformers.models.paddleocr_vl.image_processing_paddleocr_vl import smart_resize

from paddleocr_vl_manga.data.dataset import PROMPT, build_messages, fit_image, fitted_size

IGNORE_INDEX = -100
BOS_TEXT = "<|begin_of_sentence|>"
IMAGE_START, IMAGE_PLACEHOLDER, IMAGE_END = "<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>"
IMAGE_TRIPLET = IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END
# The release's generation prompts: v1 ends "Assistant: ", PaddleOCR-VL-1.5 and 1.6 end "Assistant:\n".
RELEASE_PROMPTS = tuple(f"{BOS_TEXT}User: {IMAGE_TRIPLET}{PROMPT}\nAssistant:{end}" for end in (" ", "\n"))


class PromptError(ValueError):
    """The chat template does not render the release's generation prompt (`rendered`: what it rendered)."""

    def __init__(self, message: str, rendered: str | None = None) -> None:
        super().__init__(message)
        self.rendered = rendered


class OverlongError(ValueError):
    """A sample is longer than max_length (with on_overlong='error', or a batch with nothing left)."""


def generation_prompt(processor: Any) -> str:
    """The generation prompt (one image placeholder) exactly as generation feeds it, checked against the
    release's shape; raises PromptError naming what was rendered."""
    try:
        text = processor.apply_chat_template(build_messages(), tokenize=False, add_generation_prompt=True)
    except (TemplateError, TypeError, ValueError) as e:
        raise PromptError(f"the chat template cannot render a generation prompt ({e})") from e
    if text not in RELEASE_PROMPTS:
        raise PromptError(
            f"the chat template renders the generation prompt as {text!r}; expected the release's "
            f"{RELEASE_PROMPTS[0]!r} (v1) or {RELEASE_PROMPTS[1]!r} (1.5/1.6)",
            text,
        )
    tok = processor.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    start, image, end = tok.convert_tokens_to_ids([IMAGE_START, IMAGE_PLACEHOLDER, IMAGE_END])
    i = ids.index(image) if image in ids else -1
    if (
        image != processor.image_token_id
        or [ids.count(t) for t in (start, image, end)] != [1, 1, 1]
        or ids[i - 1 : i + 2] != [start, image, end]
    ):
        raise PromptError(
            f"the tokenizer does not keep the image markers as single tokens around the image: {text!r} -> "
            f"{ids} ({IMAGE_START}, {IMAGE_PLACEHOLDER}, {IMAGE_END} = {start}, {image}, {end}; the "
            f"processor's image token id is {processor.image_token_id})",
            text,
        )
    return text


def prompt_ids(processor: Any) -> list[int]:
    """Token ids of the generation prompt, with one image placeholder (the processor repeats it per image)."""
    return processor.tokenizer(generation_prompt(processor), add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each answer tokenized on its own, with no space added before it, then eos: the labelled tokens.

    Generation continues after the prompt's standalone "▁", so the answer's tokens are the text's own. A
    tokenizer with add_prefix_space (transformers 5's default for Llama-style SentencePiece tokenizers) would
    start every answer on its own with "▁" ("あ" -> "▁", "あ") or merge it into the first piece ("OK" -> "▁O",
    "K"): a token the model must never emit there. So the answer goes through a copy of the tokenizer's
    backend with that prefix turned off (answer_backend), which gives the same ids on either setting.
    Whitespace a text starts with (" ", U+3000, "\n": Manga109's XML has some) is dropped for the same
    reason: the crop can't show it, and the metrics strip it too (evaluate.metrics.normalize).
    """
    texts = [t.lstrip() for t in texts]
    plain = answer_backend(tokenizer)
    if plain is not None:
        ids = [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    else:  # no tokenizers backend to copy: drop a bare "▁" the tokenizer put before the text
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [a[1:] if a and tokenizer.convert_ids_to_tokens(a[0]) == "▁" else a for a in ids]
    return [a + [tokenizer.eos_token_id] for a in ids]


_ANSWER_BACKENDS: WeakKeyDictionary = WeakKeyDictionary()  # tokenizer -> answer_backend(tokenizer)


def answer_backend(tokenizer: Any) -> Tokenizer | None:
    """A copy of `tokenizer`'s tokenizers backend that adds no prefix space (Metaspace prepend_scheme
    "never", no Prepend normalizer, add_prefix_space off), or None where the tokenizer adds none already
    (its own backend is used as it is) or has no backend. Built once per tokenizer and process."""
    if tokenizer in _ANSWER_BACKENDS:
        return _ANSWER_BACKENDS[tokenizer]
    backend, plain = getattr(tokenizer, "backend_tokenizer", None), None
    if backend is not None:
        spec = json.loads(backend.to_str())
        rules = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer")}
        fixed = {k: _without_prefix_space(v) for k, v in rules.items()}
        if fixed != rules:
            plain = Tokenizer.from_str(json.dumps({**spec, **fixed}))
            plain.no_padding()  # as the tokenizer's own call without padding/truncation
            plain.no_truncation()
            plain.encode_special_tokens = backend.encode_special_tokens
    _ANSWER_BACKENDS[tokenizer] = plain
    return plain


def _without_prefix_space(node: Any) -> Any:
    """A tokenizers normalizer/pre-tokenizer spec with every rule that puts "▁" before a text turned off."""
    if isinstance(node, list):
        kept = [n for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        return [_without_prefix_space(n) for n in kept]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":  # older SentencePiece conversions: a normalizer prepending "▁"
        return None
    node = {k: _without_prefix_space(v) for k, v in node.items()}
    if node.get("type") == "Metaspace":
        node["prepend_scheme"] = "never"
    if node.get("add_prefix_space"):  # Metaspace in older files, ByteLevel
        node["add_prefix_space"] = False
    return node


def whitespace_start(tokenizer: Any, ids: list[int]) -> bool:
    """Whether a label sequence starts with a piece that is only whitespace ("▁", "▁▁", a space byte)."""
    if not ids or ids[0] == tokenizer.eos_token_id:
        return False
    piece = tokenizer.convert_ids_to_tokens(ids[0])
    return not piece.replace("▁", " ").strip() or not tokenizer.decode(ids[:1]).strip()


def answer_tokens_line(tokenizer: Any, text: str) -> str:
    """One line: an answer's labelled tokens on this tokenizer, ids and pieces (logged at training start)."""
    ids = answer_ids(tokenizer, [text])[0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return f"answer tokens of {text!r} on this tokenizer: ids {ids}, pieces {pieces}"


def saved_pixel_bounds(folder: str | Path) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) of the image processor saved in `folder`, or None when it has none."""
    from transformers import AutoImageProcessor

    try:
        size = AutoImageProcessor.from_pretrained(folder).size
    except (OSError, ValueError, KeyError):
        return None  # no processor config saved with the checkpoint
    return int(size["shortest_edge"]), int(size["longest_edge"])


def configure_image_size(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None):
    """Override the processor's image size bounds; None keeps the checkpoint's processor config."""
    size = processor.image_processor.size
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels


def num_image_tokens(processor: Any, width: int, height: int) -> int:
    """Image tokens the processor will produce for a crop of this size once fit_image has padded it into a
    shape the processor takes (without decoding it)."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    width, height = fitted_size(width, height)
    h, w = smart_resize(
        height, width, factor=factor, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    return (h // ip.patch_size) * (w // ip.patch_size) // (ip.merge_size**2)


class _RopeIndex:
    """Just what PaddleOCRVLModel.get_rope_index reads of its model: the vision config's spatial_merge_size,
    and get_vision_position_ids, which reads nothing. Borrowing the two methods runs transformers' own code
    on the CPU without a model; a release whose code reads more of the model fails here (AttributeError)
    instead of computing something else, and tests/data/test_rope_ids.py compares with the model's own
    result."""

    get_rope_index = PaddleOCRVLModel.get_rope_index
    get_vision_position_ids = PaddleOCRVLModel.get_vision_position_ids

    def __init__(self, spatial_merge_size: int) -> None:
        self.config = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=spatial_merge_size))


def rope_position_ids(batch: dict[str, torch.Tensor], spatial_merge_size: int) -> torch.Tensor:
    """(3, batch, length) rope positions (temporal, height, width), exactly what the model's forward computes
    when given none: get_rope_index with the attention mask (padding gets 0).

    Passed as `position_ids`, this 3-row form makes the forward skip its own computation (per sample:
    .tolist(), .item() and boolean indexing, each a host sync on a GPU) and nothing else: the language model
    splits off a text row only from the 4-row form generation uses, and that row would also change the
    causal mask's and flash-attention's inputs, so it is not built here.
    """
    position_ids, _ = _RopeIndex(spatial_merge_size).get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return position_ids


def logits_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (1-D LongTensor) whose next token is labelled in some row: the only logits the loss reads."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def _select(batch: dict[str, torch.Tensor], keep: list[int], pad_to_multiple_of: int | None) -> None:
    """Keep the rows in `keep` (and their image patches), then trim the right padding again."""
    grid = batch["image_grid_thw"]
    patches = grid.prod(-1).tolist()
    starts = [0, *accumulate(patches)]
    batch["pixel_values"] = torch.cat([batch["pixel_values"][starts[i] : starts[i + 1]] for i in keep])
    batch["image_grid_thw"] = grid[keep]
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "sample_index"):
        if key in batch:
            batch[key] = batch[key][keep]
    length = int(batch["attention_mask"].sum(1).max())
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        if key in batch:
            batch[key] = batch[key][:, :length]


class OCRCollator:
    """Training/eval-loss batches: right padding, labels on answer + eos, max_length enforced.

    on_overlong: 'drop' removes a sample longer than max_length from its batch and counts it in
    `self.num_dropped`; 'error' raises OverlongError. Truncation is never used: cutting image tokens or the
    answer would teach the model a wrong target.

    Besides the model's inputs and `labels`, a batch holds `logits_to_keep` (logits_positions) and, with
    rope_in_collator, `position_ids` (rope_position_ids): both computed here, in the loader workers, after
    any over-long row is dropped. rope_in_collator=False leaves the rope positions to the model's forward
    (benchmarks/bench_train.py compares the two).
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None = 1536,
        on_overlong: str = "drop",
        pad_to_multiple_of: int | None = None,
        rope_in_collator: bool = True,
    ) -> None:
        if on_overlong not in ("drop", "error"):
            raise ValueError(f"on_overlong must be 'drop' or 'error', not {on_overlong!r}")
        self.processor = processor
        self.max_length = max_length
        self.on_overlong = on_overlong
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rope_in_collator = rope_in_collator
        self.prompt = generation_prompt(processor)  # a template that can't render it fails here, loudly
        self.num_dropped = 0  # only in this process: data.lengths filters the data before it gets here

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # The prompts go through the processor exactly as in generation_batch (image tokens expanded there).
        prompts = self.processor(
            text=[self.prompt] * len(examples),
            images=[ex["image"] for ex in examples],
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_tensors="pt",
        )
        answers = answer_ids(self.processor.tokenizer, [ex["text"] for ex in examples])
        n_prompt = prompts["attention_mask"].sum(1).tolist()
        lengths = [p + len(a) for p, a in zip(n_prompt, answers, strict=True)]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(examples), width)
        ids = torch.full(shape, self.processor.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(shape, dtype=prompts["attention_mask"].dtype)
        mm_types = torch.zeros(shape, dtype=prompts["mm_token_type_ids"].dtype)
        for row, (p, answer, n) in enumerate(zip(n_prompt, answers, lengths, strict=True)):
            ids[row, :p] = prompts["input_ids"][row, :p]
            ids[row, p:n] = labels[row, p:n] = torch.tensor(answer)
            mask[row, :n] = 1
            mm_types[row, :p] = prompts["mm_token_type_ids"][row, :p]
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": mm_types,
            "pixel_values": prompts["pixel_values"],
            "image_grid_thw": prompts["image_grid_thw"],
            "labels": labels,
        }
        if all("index" in ex for ex in examples):  # the trainer logs them (--log_sample_ids), not the model
            batch["sample_index"] = torch.tensor([ex["index"] for ex in examples])

        if self.max_length is not None:
            keep = [i for i, n in enumerate(lengths) if n <= self.max_length]
            if len(keep) < len(examples):
                over = [(examples[i].get("id"), lengths[i]) for i in range(len(examples)) if i not in keep]
                if self.on_overlong == "error":
                    raise OverlongError(f"samples longer than max_length={self.max_length}: {over}")
                if not keep:
                    raise OverlongError(
                        f"every sample in the batch exceeds max_length={self.max_length}: {over}; filter "
                        "them out of the dataset (the training script does) or raise max_length"
                    )
                self.num_dropped += len(examples) - len(keep)
                _select(batch, keep, self.pad_to_multiple_of)
        batch["logits_to_keep"] = logits_positions(batch["labels"])
        if self.rope_in_collator:  # the image processor's merge size is the model's spatial_merge_size
            batch["position_ids"] = rope_position_ids(batch, self.processor.image_processor.merge_size)
        return batch


def generation_batch(processor: Any, images: list, *, pad_to_multiple_of: int | None = None) -> dict:
    """Left-padded prompts (one image each) ready for `model.generate`."""
    return dict(
        processor(
            text=[generation_prompt(processor)] * len(images),
            images=[fit_image(im) for im in images],
            padding=True,
            padding_side="left",
            pad_to_multiple_of=pad_to_multiple_of,
            add_special_tokens=False,
            return_tensors="pt",
        )
    )
