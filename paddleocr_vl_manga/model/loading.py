"""Load a PaddleOCR-VL model and its processor (hub id or local folder) with the native transformers classes.

It adds two things over ``from_pretrained``. First, protection against the untied-lm_head trap:

The released ``PaddlePaddle/PaddleOCR-VL`` config.json is flat (text settings at the top level) with
``"tie_word_embeddings": false`` and its safetensors hold their own ``lm_head.weight``. In transformers 5,
``PaddleOCRVLConfig.__post_init__`` builds ``text_config`` from the flat keys *without* that flag, so the
text config gets the default ``True``, which is then forwarded to the outer config: the loaded config says
``tie_word_embeddings=True``. ``from_pretrained`` happens to skip the tie (both tensors are in the checkpoint
with different values, it only warns), but the config is wrong, so any later ``model.tie_weights()`` (token
resizing, adapters, ...) silently replaces the trained lm_head with the input embeddings, and a fine-tuned
save carries the wrong flag on. We read the checkpoint's keys first and, when it has an ``lm_head.weight``,
load with both flags forced to ``False``; afterwards we check that the two tensors really are separate.

Second, it makes sure the model is prompted as released. The generation prompt is rendered and checked once
at load (custom_collator.generation_prompt): one image run between the vision start/end ids, then ``OCR:``
and the assistant prefix. The v1 template published with the model sets the image markers through a
variable ``image_token`` (default: the start/placeholder/end triplet) that transformers 5 overrides with the
tokenizer's ``<|IMAGE_PLACEHOLDER|>``, so it renders the image without its markers, in training and
evaluation alike. Such a template is corrected in memory (one warning); any other unexpected prompt fails,
naming the template file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from paddleocr_vl_manga.data.collator import (
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    IMAGE_TRIPLET,
    PromptError,
    generation_prompt,
)

logger = logging.getLogger("ocr_model")  # the name before the move to paddleocr_vl_manga


def declare_mrope_section() -> None:
    """Stop transformers warning "Unrecognized keys in `rope_parameters` ... {'mrope_section'}" 2-4 times a
    command. The release's config.json has `rope_scaling: {"mrope_section": [16, 24, 24], "rope_type":
    "default"}`, and PaddleOCR-VL's text rotary embedding reads mrope_section from there; transformers 5.x's
    PaddleOCRTextConfig just does not list the key, where Qwen2-VL's config lists it through this same
    class attribute. Called at import, so every command that loads a model or writes a config is covered."""
    from transformers.models.paddleocr_vl.configuration_paddleocr_vl import PaddleOCRTextConfig

    known = set(getattr(PaddleOCRTextConfig, "ignore_keys_at_rope_validation", None) or ())
    PaddleOCRTextConfig.ignore_keys_at_rope_validation = known | {"mrope_section"}


declare_mrope_section()
_QUIET: dict[str, Any] = {
    "_raise_exceptions_for_missing_entries": False,
    "_raise_exceptions_for_connection_errors": False,
}
# Prepended to a template whose image markers come from the `image_token` variable: a top-level `set`
# shadows the value transformers passes in, so the template renders the release's triplet again.
MARKER_FIX = '{%- set image_token = "' + IMAGE_TRIPLET + '" -%}\n'


class ModelLoadError(ValueError):
    """The model or processor could not be loaded (bad path, unreachable hub id, inconsistent checkpoint)."""


# How to go on without the hub, named in every error that needs it (tools/make_tiny_model.py's flags).
NO_HUB_HINT = (
    "give a local model folder instead, or make the offline stand-in model: "
    "python tools/make_tiny_model.py --release_like v1 --out ./tiny_model"
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: exactly one slash, no ./ or / in front


def _looks_like_local_path(model_path: str) -> bool:
    """Whether model_path names a folder rather than a hub id; a folder is never sent to the hub, so a typo
    in its name fails at once saying so instead of after the hub's retries.

    A hub id is `org/name` (PaddlePaddle/PaddleOCR-VL): one slash, nothing path-like in front, and `org` is
    not a folder here. Anything else, a bare `sft_ouput` included, is a path (hub ids without an org are a
    handful of 2019 models, none of them PaddleOCR-VL)."""
    if os.path.exists(model_path) or os.path.isabs(model_path) or model_path.startswith((".", "~")):
        return True
    if model_path.endswith(("/", os.sep)) or (os.sep != "/" and os.sep in model_path):
        return True
    return not HUB_ID.fullmatch(model_path) or os.path.isdir(model_path.split("/")[0])


def _missing_folder(model_path: str) -> str:
    """The error for a model folder that does not exist, with the nearest existing name beside it."""
    import difflib

    folder = Path(model_path).expanduser()
    parent = folder.parent if folder.parent.is_dir() else None
    near = difflib.get_close_matches(
        folder.name, [p.name for p in parent.iterdir() if p.is_dir()] if parent else [], n=1, cutoff=0.8
    )
    hint = f"; did you mean {str(parent / near[0]) if str(parent) != '.' else near[0]!r}?" if near else ""
    if "/" not in model_path and not near:
        hint = f"; a hub id has the form org/name (PaddlePaddle/PaddleOCR-VL), or {NO_HUB_HINT}"
    if HUB_ID.fullmatch(model_path):  # maybe a real hub id whose org shares a folder name (a git clone)
        hint += (f"; not tried as a hub id because {model_path.split('/')[0]!r} is a folder here: run from "
                 "another folder to load it from the hub")
    return f"model folder {model_path!r} does not exist (resolved to {folder.resolve()}){hint}"


_HUB_ACCESS: dict[str, bool] = {}  # hub id -> load from the cache only (_hub_files_only's verdict)


def _files_only(model_path: str) -> dict[str, bool]:
    return {"local_files_only": _HUB_ACCESS.get(model_path, False)}


def _hub_files_only(model_id: str) -> bool:
    """Whether to load the hub id `model_id` from the local cache only; raise ModelLoadError at once when
    the hub cannot be used and the cache lacks it.

    HF_HUB_OFFLINE: the cache only. Otherwise one HEAD request with no retries: huggingface_hub would retry
    a refused or unresolvable connection 5 times (23-28 s, each warning printed again by every loader)
    before transformers gives up or falls back to the cache."""
    if model_id in _HUB_ACCESS:
        return _HUB_ACCESS[model_id]
    from huggingface_hub import constants, get_session

    cached = cached_file(model_id, "config.json", local_files_only=True, **_QUIET) is not None
    if constants.is_offline_mode():
        if not cached:
            raise ModelLoadError(
                f"HF_HUB_OFFLINE is set and {model_id!r} is not in the hub cache: {NO_HUB_HINT}"
            )
        _HUB_ACCESS[model_id] = True
        return True
    try:  # HF_HUB_ETAG_TIMEOUT (10 s unless raised for a slow link), as huggingface_hub's own HEAD waits
        get_session().head(f"{constants.ENDPOINT}/{model_id}/resolve/main/config.json",
                           timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
    except Exception as e:  # any failure to get an HTTP answer: DNS, refused, timeout, proxy, TLS
        if not cached:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelLoadError(
                f"{model_id!r} is no folder here, so a hub id, but {constants.ENDPOINT} cannot be reached "
                f"({reason}) and the hub cache does not hold it: {NO_HUB_HINT}"
            ) from None
        logger.warning("%s cannot be reached (%s): loading %s from the hub cache",
                       constants.ENDPOINT, e, model_id)
        _HUB_ACCESS[model_id] = True
        return True
    _HUB_ACCESS[model_id] = False
    return False


def _checkpoint_keys(model_path: str) -> set[str] | None:
    """Tensor names in the safetensors checkpoint (header/index only), or None if it has no safetensors."""
    index = cached_file(model_path, SAFE_WEIGHTS_INDEX_NAME, **_QUIET, **_files_only(model_path))
    if index:
        return set(json.loads(Path(index).read_text())["weight_map"])
    single = cached_file(model_path, SAFE_WEIGHTS_NAME, **_QUIET, **_files_only(model_path))
    if single:
        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    return None


def _force_untied(config: PreTrainedConfig) -> None:
    config.tie_word_embeddings = False
    # Also the text config: saving then reloading would otherwise forward its True back to the outer config.
    text_config = config.get_text_config()
    if text_config is not config and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False


def template_file(model_path: str) -> str:
    """The file holding the checkpoint's chat template (named in errors and warnings)."""
    names = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")
    for name in names:
        path = cached_file(model_path, name, **_QUIET, **_files_only(model_path))
        if path and (name.endswith(".jinja") or "chat_template" in json.loads(Path(path).read_text())):
            return path
    return f"{model_path} (no chat template file)"


def ensure_release_prompt(config: PreTrainedConfig, processor: Any, source: Callable[[], str]) -> None:
    """Make sure generation and training prompt the model as released, or raise ModelLoadError.

    source() names the template's file; it is called only to report (finding the file may ask the hub). A
    template that renders the release's prompt only once `image_token`
    is the full marker triplet (the published v1 template under transformers 5) is corrected in memory.
    """
    tok = processor.tokenizer
    for attr, token in (
        ("image_token_id", IMAGE_PLACEHOLDER),
        ("vision_start_token_id", IMAGE_START),
        ("vision_end_token_id", IMAGE_END),
    ):
        if getattr(config, attr, None) != tok.convert_tokens_to_ids(token):
            raise ModelLoadError(
                f"config.json has {attr}={getattr(config, attr, None)} but the tokenizer's {token} is "
                f"{tok.convert_tokens_to_ids(token)}: model and tokenizer do not belong together"
            )
    try:
        generation_prompt(processor)
        return
    except PromptError as e:
        error = e
    template = processor.chat_template
    if isinstance(template, str):
        processor.chat_template = MARKER_FIX + template
        try:
            generation_prompt(processor)
        except PromptError:
            processor.chat_template = template
        else:
            logger.warning(
                "%s renders the image without %s/%s (%r): the template takes its image markers from the "
                "variable `image_token`, which transformers 5 sets to the tokenizer's %s. Rendering the "
                "release's markers explicitly.",
                source(), IMAGE_START, IMAGE_END, error.rendered, IMAGE_PLACEHOLDER,
            )
            return
    raise ModelLoadError(f"{source()}: {error}") from error


class CheckedModel(NamedTuple):
    """What load_config_and_processor found: everything about a checkpoint but its weights."""

    path: str  # resolved: a local folder's absolute path, or the hub id
    config: PreTrainedConfig
    processor: Any
    has_lm_head: bool | None  # None: the checkpoint has no safetensors to look into


def _one_line(error: Exception) -> str:
    """transformers' messages run over several lines; a user error is one."""
    return " ".join(str(error).split())


def _where(model_path: str) -> str:
    return "local folder" if os.path.isdir(model_path) else "Hugging Face hub id"


def load_config_and_processor(model_path: str, *, trust_remote_code: bool = False) -> CheckedModel:
    """Config and processor of a checkpoint, checked as for loading the model, without reading any weights
    (sft plans memory with these before it loads the model)."""
    model_path = str(model_path)
    if _looks_like_local_path(model_path):
        folder = Path(model_path).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(_missing_folder(model_path))
        if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{model_path!r} holds a LoRA adapter only (a checkpoint of a --lora_r run): use the run's "
                f"merged final model, or merge this one: python export_model.py {model_path} --base BASE "
                "--out DIR"
            )
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{model_path!r} is a folder but has no config.json: not a saved model")
        model_path = str(folder)
    else:
        _hub_files_only(model_path)
    where = _where(model_path)
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                            **_files_only(model_path))
        keys = _checkpoint_keys(model_path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load a model config from {model_path!r} (tried as {where}): {_one_line(e)}"
        ) from e

    has_lm_head = None if keys is None else any(k.endswith("lm_head.weight") for k in keys)
    if has_lm_head:
        _force_untied(config)
    elif has_lm_head is False and not getattr(config, "tie_word_embeddings", True):
        raise ModelLoadError(
            f"{model_path!r}: config says the lm_head is untied but the checkpoint has no lm_head.weight; "
            "loading would leave a randomly initialised lm_head"
        )
    try:
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                  **_files_only(model_path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load the processor from {model_path!r} (tried as {where}): {_one_line(e)}"
        ) from e
    ensure_release_prompt(config, processor, lambda: template_file(model_path))
    return CheckedModel(model_path, config, processor, has_lm_head)


def load_model_and_processor(
    model_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    checked: CheckedModel | None = None,
) -> tuple[Any, Any]:
    """Return ``(model, processor)`` for a hub id or local folder; raise ``ModelLoadError`` on failure.

    `checked`: what load_config_and_processor returned for this path, when the caller needed it first."""
    path, config, processor, has_lm_head = checked or load_config_and_processor(
        model_path, trust_remote_code=trust_remote_code
    )
    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": trust_remote_code, **_files_only(path)}
    if kwargs["local_files_only"]:  # transformers does not pass it on to its adapter_config.json lookup (5
        kwargs["adapter_kwargs"] = {"local_files_only": True}  # retries, 23 s, with the hub unreachable)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load the model from {path!r} (tried as {_where(path)}): {_one_line(e)}"
        ) from e

    if has_lm_head:
        lm_head = model.get_output_embeddings().weight
        if lm_head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            raise ModelLoadError(f"{path!r}: checkpoint has its own lm_head.weight but it got tied")
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def load_for_inference(
    model_path: str,
    *,
    quantize: str | None = None,
    force_cpu: bool = False,
    allow_mps: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, Any, str]:
    """(model, processor, device) as evaluation, prediction and MangaOcr run it: bf16 on CUDA, else fp32
    (Apple MPS when allowed), or with `quantize` (ocr_quantize.METHODS) int8 linear layers on the CPU."""
    device = "cpu"  # int8 is a CPU path
    if quantize is None and not force_cpu:
        if torch.cuda.is_available():
            device = "cuda"
        elif allow_mps and torch.backends.mps.is_available():
            device = "mps"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor = load_model_and_processor(model_path, dtype=dtype, device=device,
                                                trust_remote_code=trust_remote_code)
    if quantize is not None:
        from paddleocr_vl_manga.model.quantize import quantize_model

        model = quantize_model(model, quantize)
    return model, processor, device


def workers_fork() -> bool:
    """Whether loader workers start by fork. With spawn (Windows, macOS) each worker imports torch and
    transformers anew at every generate call: seconds per call, more than the overlap can win back."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def default_num_workers(device: str) -> int:
    """Generation's loader workers when the user names none.

    CUDA: 2, leaving at least one core to the main process, which drives the GPU. One worker keeps up as long
    as decoding and preprocessing a batch takes less than generating it; the second covers the batches of the
    largest crops and a slow disk, for the cost of one more forked process. CPU: none. generate() already runs
    torch's threads on every core there, so a worker competes with it for the same cores instead of filling
    time a device would otherwise sit idle."""
    if not device.startswith("cuda") or not workers_fork():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(2, cores - 1))


@runtime_checkable
class Crops(Protocol):
    """What generation reads: sizes in the main process (they order the batches, nothing is decoded there)
    and images where the loader runs, a worker process when num_workers > 0. ocr_dataset.RecordCrops (JSONL
    records), predict.py's files and page boxes, and ImageList (images in memory) implement it."""

    def __len__(self) -> int: ...

    def size(self, i: int) -> tuple[int, int]: ...  # (width, height), as image(i) will have it

    def image(self, i: int) -> Image.Image: ...


class ImageList:
    """Crops already decoded. Workers inherit them when they fork (spawn would pickle them)."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def size(self, i: int) -> tuple[int, int]:
        return self.images[i].size

    def image(self, i: int) -> Image.Image:
        return self.images[i]


class _WorkerError:
    """An exception raised in a loader worker, sent back as data and raised again in the main process.

    Raised there, DataLoader would re-raise it as the same type with the worker's traceback in its message,
    so a DatasetError would no longer print as one `error:` line. The traceback rides along as a note."""

    def __init__(self, error: Exception) -> None:
        import pickle
        import traceback

        note = "raised in a generation loader worker:\n" + "".join(traceback.format_exception(error)).rstrip()
        try:
            pickle.loads(pickle.dumps(error))  # an exception that cannot travel would hang the loader
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        self.error, self.note = error, note

    def raise_again(self) -> None:
        self.error.add_note(self.note)
        raise self.error


class _Batches(torch.utils.data.Dataset):
    """Item b: batch b's crops loaded and turned into generate() inputs (runs in a worker when there are)."""

    def __init__(self, processor: Any, crops: Crops, batches: list[list[int]]) -> None:
        self.processor, self.crops, self.batches = processor, crops, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[list[int], dict[str, torch.Tensor] | _WorkerError]:
        from paddleocr_vl_manga.data.collator import generation_batch  # fit_image happens in there

        idx = self.batches[b]
        try:
            return idx, generation_batch(self.processor, [self.crops.image(i) for i in idx])
        except Exception as e:
            if torch.utils.data.get_worker_info() is None:
                raise  # the main process: it keeps its own traceback
            return idx, _WorkerError(e)


def pin_memory(model: Any, num_workers: int) -> bool:
    """Whether generation's loader pins its batches: on CUDA, with workers. Pinned pages make the copy to the
    GPU asynchronous; without workers, pinning is one more copy in the main process."""
    return next(model.parameters()).device.type == "cuda" and num_workers > 0


def _quiet_worker(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the main process alone handles it and shuts the workers down.
    A worker it interrupted mid-send printed a traceback (fd sharing), so workers ignore SIGINT; and when the
    main process leaves in the middle of fetching a batch's file descriptors, the worker's resource_sharer
    thread fails to accept that connection and prints it through sys.excepthook: nothing a user can act on."""
    import signal
    from multiprocessing import AuthenticationError

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError, AuthenticationError)):
            report(kind, value, tb)

    sys.excepthook = hook


def _as_is(item: Any) -> Any:  # collate_fn: items already are batches (a module function: spawn pickles it)
    return item


class Chunk(NamedTuple):
    """Consecutive crops of a crop_chunks plan; its batches are loaded as generate_texts asks for them."""

    positions: list[int]  # the crops' indices, ascending
    batches: Iterator[tuple[list[int], dict[str, torch.Tensor]]]
    num_batches: int
    sizes: dict[int, tuple[int, int]]  # crop index -> (width, height): the answer's token cap follows it


# Bounded answers. A reader's tool calls once per text line and waits: a model that loops on a blurry or
# empty crop (PaddleOCR #17903, #16710) must stop early, and no crop may run to a large fixed cap.
AUTO_MAX_NEW_TOKENS = 256  # the cap when none is given; each crop's own cap (auto_max_new_tokens) is lower
PIXELS_PER_TOKEN = 100  # a 10 x 10 px glyph, smaller than printed manga text: at most one token each
LOOP_MAX_NGRAM = 12  # a loop is the same n-gram (n <= this) repeated ...
LOOP_MIN_REPEATS = 4  # ... at least this often ...
LOOP_MIN_SPAN = 24  # ... over at least this many tokens ("ドドドド…" of 23 same tokens still passes)


def generation_flag_error(
    max_new_tokens: int | None, min_pixels: int | None, max_pixels: int | None
) -> str | None:
    """What is wrong with evaluation's and prediction's generation flags, before anything loads; None: fine.

    --max_new_tokens 0 was ignored (each crop's own cap) while metrics.json recorded 0, -1 crashed in
    generate(); --min_pixels above --max_pixels resized every crop to the wrong budget (CER 406 % against
    26.5 % on the same crops)."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        return (f"--max_new_tokens must be a positive number of tokens, got {max_new_tokens} (leave it out "
                "for each crop's own cap, from its size)")
    for flag, value in (("--min_pixels", min_pixels), ("--max_pixels", max_pixels)):
        if value is not None and value <= 0:
            return f"{flag} must be a positive number of pixels, got {value}"
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        return f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}: give min_pixels <= max_pixels"
    return None


def pixel_bounds_error(processor: Any, model_path: str) -> str | None:
    """The image budget after --min_pixels / --max_pixels met the checkpoint's own (one flag alone can
    cross the other bound of preprocessor_config.json); None: fine."""
    size = processor.image_processor.size
    low, high = size["shortest_edge"], size["longest_edge"]
    if low > high:
        return (f"min_pixels {low} is above max_pixels {high} (flags and {model_path}'s "
                "preprocessor_config.json together): give min_pixels <= max_pixels")
    return None


def auto_max_new_tokens(width: int, height: int, cap: int = AUTO_MAX_NEW_TOKENS) -> int:
    """A crop's token cap: 16 plus one token per PIXELS_PER_TOKEN px of the crop as given, at most `cap`."""
    return max(1, min(cap, 16 + math.ceil(width * height / PIXELS_PER_TOKEN)))


def loop_tail(tokens: Sequence[int]) -> int:
    """How many trailing tokens to cut when the sequence ends in a loop (all but one pass of it), else 0."""
    for n in range(1, LOOP_MAX_NGRAM + 1):
        k = max(LOOP_MIN_REPEATS, math.ceil(LOOP_MIN_SPAN / n))
        tail = list(tokens[-k * n :])
        if len(tail) == k * n and tail == tail[:n] * k:
            return (k - 1) * n
    return 0


class LoopAndCapStop:
    """generate()'s stopping criterion: each sequence ends at its own token cap or once it loops
    (loop_tail's rule, on the device without reading anything back)."""

    def __init__(self, prompt_length: int, caps: torch.Tensor) -> None:
        self.prompt_length, self.caps = prompt_length, caps

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]
        done = new.shape[1] >= self.caps
        for n in range(1, LOOP_MAX_NGRAM + 1):
            k = max(LOOP_MIN_REPEATS, math.ceil(LOOP_MIN_SPAN / n))
            if new.shape[1] < k * n:
                break
            tail = new[:, -k * n :].reshape(len(new), k, n)
            done = done | (tail == tail[:, :1]).flatten(1).all(1)
        return done


class Reading(NamedTuple):
    """One crop's answer and why generation ended: eos (the model finished), cap (its token cap was
    reached) or loop (the repetition guard stopped it; the repeats are cut from the text)."""

    text: str
    stop: str


def _raise_worker_errors(batches: Iterator) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    for idx, batch in batches:
        if isinstance(batch, _WorkerError):
            batch.raise_again()
        yield idx, batch


def crop_chunks(
    processor: Any,
    crops: Crops,
    *,
    batch_size: int,
    chunk_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Chunk]:
    """Cut `crops` into chunks of chunk_size consecutive crops (None: one chunk) and each chunk into batches
    of similar image-token count, all read through one DataLoader.

    With num_workers > 0, worker processes load and preprocess the next batches, across chunk boundaries,
    while the model generates; batches still arrive in order, and an error reaches the caller when its
    batch's turn comes (so every chunk before it is complete). Feed each chunk to generate_texts, in order.
    Close the generator (contextlib.closing) to stop the workers early.
    """
    from torch.utils.data import DataLoader

    from paddleocr_vl_manga.data.collator import num_image_tokens

    n = len(crops)
    if n == 0:
        return
    step = chunk_size or n
    tokens = [num_image_tokens(processor, *crops.size(i)) for i in range(n)]
    plan = []
    for start in range(0, n, step):
        part = sorted(range(start, min(start + step, n)), key=tokens.__getitem__)
        plan.append([part[k : k + batch_size] for k in range(0, len(part), batch_size)])
    dataset = _Batches(processor, crops, [batch for chunk in plan for batch in chunk])
    loader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
        worker_init_fn=_quiet_worker,
    )
    batches = _raise_worker_errors(iter(loader))
    for chunk in plan:
        positions = sorted(i for batch in chunk for i in batch)
        yield Chunk(positions, islice(batches, len(chunk)), len(chunk), {i: crops.size(i) for i in positions})


def generate_texts(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image] | Crops | Chunk,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
    num_workers: int = 0,
) -> list[str]:
    """Greedy OCR of crops: the texts of generate_readings."""
    return [r.text for r in generate_readings(
        model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
        use_cache=use_cache, num_workers=num_workers,
    )]


@torch.inference_mode()
def generate_readings(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image] | Crops | Chunk,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
    num_workers: int = 0,
) -> list[Reading]:
    """Greedy OCR of crops, batched with left padding and the KV cache; results in input order.

    `images`: decoded crops, a Crops (read by `num_workers` loader processes, prefetching while the model
    generates), or one Chunk of crop_chunks (batched there already: batch_size and num_workers do not apply;
    the results follow chunk.positions). Crops are sorted by their image-token count so each batch pads
    little.
    max_new_tokens: None gives each crop its own cap from its size (auto_max_new_tokens); a number is the cap
    of every crop. A sequence that loops is stopped and its repeats cut (loop_tail). The released generation
    config turns the KV cache off (the seed evaluated that way, one crop at a time: batch_size=1,
    use_cache=False); the cache is what makes batches fast.
    """
    if max_new_tokens is not None and max_new_tokens <= 0:  # 0 used to mean "auto" silently
        raise ValueError(f"max_new_tokens must be positive (None: each crop's own cap), got {max_new_tokens}")
    if isinstance(images, Chunk):
        return _generate_chunk(model, processor, images, max_new_tokens, progress, use_cache)
    crops = images if isinstance(images, Crops) else ImageList(images)
    with closing(crop_chunks(processor, crops, batch_size=batch_size, num_workers=num_workers,
                             pin_memory=pin_memory(model, num_workers))) as chunks:
        return [r for chunk in chunks for r in _generate_chunk(model, processor, chunk, max_new_tokens,
                                                               progress, use_cache)]


def _read(tokens: list[int], eos_id: int, pad_id: int, cap: int) -> tuple[list[int], str]:
    """A generated row -> (answer tokens, why it ended)."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], "eos"
    while tokens and tokens[-1] == pad_id:  # rows stopped before the batch's last step are padded
        tokens = tokens[:-1]
    cut = loop_tail(tokens)
    if cut:
        return tokens[:-cut], "loop"
    return tokens, "cap" if len(tokens) >= cap else "eos"


def _generate_chunk(
    model: Any, processor: Any, chunk: Chunk, max_new_tokens: int | None, progress: bool, use_cache: bool
) -> list[Reading]:
    from tqdm import tqdm
    from transformers import StoppingCriteriaList

    readings: dict[int, Reading] = {}
    device = next(model.parameters()).device
    pad_id = processor.tokenizer.pad_token_id
    eos_id = processor.tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(chunk.batches, total=chunk.num_batches, desc="generating", disable=not progress,
                   unit="batch")
        for idx, batch in bar:  # the loader prepares the next batches meanwhile
            caps = [max_new_tokens or auto_max_new_tokens(*chunk.sizes[i]) for i in idx]  # checked > 0
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            n_prompt = batch["input_ids"].shape[1]
            stop = LoopAndCapStop(n_prompt, torch.tensor(caps, device=device))
            out = model.generate(
                **batch, max_new_tokens=max(caps), do_sample=False, use_cache=use_cache,
                pad_token_id=pad_id, eos_token_id=eos_id, stopping_criteria=StoppingCriteriaList([stop]),
            )
            for i, row, cap in zip(idx, out[:, n_prompt:].tolist(), caps, strict=True):
                tokens, why = _read(row, eos_id, pad_id, cap)
                readings[i] = Reading(processor.decode(tokens, skip_special_tokens=True), why)
    finally:  # also when generation fails, e.g. during training-time evaluation
        model.train(was_training)
    return [readings[i] for i in chunk.positions]
