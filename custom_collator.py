"""Batches for PaddleOCR-VL: training batches (labels on the answer only) and generation prompts.

The answer boundary is derived from the processor's own chat template: each sample is rendered with and
without its answer, and the tokens of the prompt must be a prefix of the tokens of the full conversation.
Labels are -100 everywhere but on the answer and the end-of-sequence token. A sample whose boundary can't be
found raises instead of being silently masked out (the seed project's NaN loss at batch size 1).
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import Any

import torch

try:  # the PIL image-processor module needs no torchvision; fall back for releases without it
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import smart_resize
except ImportError:
    from transformers.models.paddleocr_vl.image_processing_paddleocr_vl import smart_resize

from ocr_dataset import build_messages

IGNORE_INDEX = -100


class BoundaryError(ValueError):
    """The chat template's prompt is not a token prefix of the full conversation."""


class OverlongError(ValueError):
    """A sample is longer than max_length (with on_overlong='error', or a batch with nothing left)."""


def configure_image_size(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None):
    """Override the processor's image size bounds; None keeps the checkpoint's processor config."""
    size = processor.image_processor.size
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels


def num_image_tokens(processor: Any, width: int, height: int) -> int:
    """Image tokens the processor will produce for an image of this size (without decoding it)."""
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(
        height, width, factor=factor, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"]
    )
    return (h // ip.patch_size) * (w // ip.patch_size) // (ip.merge_size**2)


def _render(processor: Any, messages: list[dict], generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _select(batch: dict[str, torch.Tensor], keep: list[int], pad_to_multiple_of: int | None) -> None:
    """Keep the rows in `keep` (and their image patches), then trim the right padding again."""
    grid = batch["image_grid_thw"]
    patches = grid.prod(-1).tolist()
    starts = [0, *accumulate(patches)]
    batch["pixel_values"] = torch.cat([batch["pixel_values"][starts[i] : starts[i + 1]] for i in keep])
    batch["image_grid_thw"] = grid[keep]
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
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
    """

    def __init__(
        self,
        processor: Any,
        *,
        max_length: int | None = 1536,
        on_overlong: str = "drop",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if on_overlong not in ("drop", "error"):
            raise ValueError(f"on_overlong must be 'drop' or 'error', not {on_overlong!r}")
        self.processor = processor
        self.max_length = max_length
        self.on_overlong = on_overlong
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_token_id = processor.image_token_id
        self.num_dropped = 0
        self.seen_ids: list = []  # sample ids collated, in order (written out by --log_sample_ids)

    def _prompt_ids(self, prompt: str, n_image_tokens: int) -> list[int]:
        ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise BoundaryError(f"expected one image placeholder in the rendered prompt {prompt!r}")
        i = ids.index(self.image_token_id)
        return ids[:i] + [self.image_token_id] * n_image_tokens + ids[i + 1 :]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        fulls, prompts = [], []
        self.seen_ids.extend(ex.get("id") for ex in examples)
        for ex in examples:
            full = _render(self.processor, ex["messages"], generation_prompt=False)
            prompt = _render(self.processor, ex["messages"][:-1], generation_prompt=True)
            if not full.startswith(prompt) or len(full) == len(prompt):
                raise BoundaryError(
                    f"sample {ex.get('id')}: the chat template renders the prompt as {prompt!r}, which does "
                    f"not start the full conversation {full!r}; cannot tell where the answer begins"
                )
            fulls.append(full)
            prompts.append(prompt)
        batch = dict(
            self.processor(
                text=fulls,
                images=[ex["image"] for ex in examples],
                padding=True,
                padding_side="right",
                pad_to_multiple_of=self.pad_to_multiple_of,
                add_special_tokens=False,
                return_tensors="pt",
            )
        )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.clone()
        labels[mask == 0] = IGNORE_INDEX
        for row, prompt in enumerate(prompts):
            n_img = int((ids[row] == self.image_token_id).sum())
            prompt_ids = self._prompt_ids(prompt, n_img)
            n = len(prompt_ids)
            if ids[row, :n].tolist() != prompt_ids or n >= int(mask[row].sum()):
                raise BoundaryError(
                    f"sample {examples[row].get('id')}: prompt tokens are not a prefix of the conversation "
                    "tokens (the tokenizer merges across the answer boundary)"
                )
            labels[row, :n] = IGNORE_INDEX
        batch["labels"] = labels

        if self.max_length is not None:
            lengths = mask.sum(1).tolist()
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
        return batch


def generation_batch(processor: Any, images: list, *, pad_to_multiple_of: int | None = None) -> dict:
    """Left-padded prompts (one image each) ready for `model.generate`."""
    prompt = _render(processor, build_messages(), generation_prompt=True)
    return dict(
        processor(
            text=[prompt] * len(images),
            images=images,
            padding=True,
            padding_side="left",
            pad_to_multiple_of=pad_to_multiple_of,
            add_special_tokens=False,
            return_tensors="pt",
        )
    )
