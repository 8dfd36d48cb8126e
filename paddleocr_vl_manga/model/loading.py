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
at load (data.collator.generation_prompt): one image run between the vision start/end ids, then ``OCR:``
and the assistant prefix. The v1 template published with the model sets the image markers through a
variable ``image_token`` (default: the start/placeholder/end triplet) that transformers 5 overrides with the
tokenizer's ``<|IMAGE_PLACEHOLDER|>``, so it renders the image without its markers, in training and
evaluation alike. Such a template is corrected in memory (one warning); any other unexpected prompt fails,
naming the template file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
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
    full_vocabulary: bool = False,
    vision_runtime: str | None = None,
) -> tuple[Any, Any, str]:
    """(model, processor, device) as evaluation, prediction and MangaOcr run it: bf16 on CUDA, else fp32
    (Apple MPS when allowed), or with `quantize` (model.quantize.METHODS) int8 linear layers on the CPU.
    lm_head keeps only the rows of the model's output_vocabulary.json where it has one, unless
    full_vocabulary (model.output_vocabulary).
    `vision_runtime` (model.vision_runtime.RUNTIMES; None or "torch": PyTorch) runs the vision tower on that
    CPU runtime, int8 when quantize is "int8". On the CPU, torch uses one thread per physical core unless
    the user chose (model.cpu_threads.use_physical_cores)."""
    compiled_vision = vision_runtime not in (None, "torch")
    if compiled_vision:
        from paddleocr_vl_manga.model.vision_runtime import require

        try:  # a missing package fails before minutes of loading, as one line
            require(vision_runtime)
        except (ImportError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
    device = "cpu"  # int8 and the vision runtimes are CPU paths
    if quantize is None and not force_cpu and not compiled_vision:
        if torch.cuda.is_available():
            device = "cuda"
        elif allow_mps and torch.backends.mps.is_available():
            device = "mps"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor = load_model_and_processor(model_path, dtype=dtype, device=device,
                                                trust_remote_code=trust_remote_code)
    from paddleocr_vl_manga.model.output_vocabulary import OutputVocabularyError, apply_output_vocabulary

    try:  # before int8, which then quantizes the small head as it would the full one
        apply_output_vocabulary(model, model_path, full_vocabulary=full_vocabulary, **_files_only(model_path))
    except OutputVocabularyError as e:
        raise ModelLoadError(str(e)) from None
    if device == "cpu":
        from paddleocr_vl_manga.model.cpu_threads import use_physical_cores

        use_physical_cores()
    if compiled_vision:
        from paddleocr_vl_manga.model.vision_runtime import attach_vision_runtime

        model = attach_vision_runtime(model, vision_runtime, int8=quantize == "int8")
        quantize = quantize and "int8-text"  # the PyTorch tower no longer runs: leave it unquantized
    if quantize is not None:
        from paddleocr_vl_manga.model.quantize import quantize_model

        model = quantize_model(model, quantize)
    return model, processor, device
