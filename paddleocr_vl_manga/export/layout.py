"""Export a fine-tuned checkpoint as a drop-in replacement for the base model it was trained from.

    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 [--base PaddlePaddle/PaddleOCR-VL]
    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 --gguf [--gguf_type q8_0]

transformers loads PaddleOCR-VL without two groups of the release's tensors
(``visual.vision_model.embeddings.packing_position_embedding.*`` and ``visual.vision_model.head.*``) and so
saves a model without them; it also writes its own config.json, tokenizer and processor files. vLLM (before
March 2026) and PaddleX refuse such a folder, and a fine-tune with rewritten configs can fail where the base
works. The exported folder has the base's file set instead:

- every file of the base (config.json, tokenizer, preprocessor config, chat template, generation config, ...)
  copied unchanged, except the image processor's pixel bounds when training changed them (--min_pixels /
  --max_pixels, read from the checkpoint's own processor config);
- the weights in the base's key layout, shards and dtype (bf16 for the release): the
  checkpoint's tensors cast to the base's dtype, and the tensors transformers does not load copied from the
  base byte for byte.

sft_paddleocr_vl.py exports its final model this way (in place, in --output_dir); use this command for any
intermediate ``checkpoint-N``. A checkpoint of a LoRA run (--lora_r) holds only the adapter: it is merged into
the base first (model.lora.merge_lora), then exported the same way. The result still loads with
AutoModelForImageTextToText / AutoProcessor.

--out is written whole or not at all: everything (the GGUF files too) is made in a staging folder beside it,
.<name>.export-partial, then renamed into place, so a failure (a failed conversion, a full disk) leaves no
--out and the same command can be run again. An --out that exists (empty, perhaps a mount point) is kept:
the staging folder is made inside it and its files are moved in.

--base is needed only for a folder that does not say which base it was trained from: sft_paddleocr_vl.py
writes base_model.json into every checkpoint and its output folder, and a LoRA checkpoint's
adapter_config.json names its base (base_model_name_or_path).

--gguf also writes, into --out, the files llama.cpp runs (docs/export_gguf.md): model-<type>.gguf (the
language model) and mmproj-<type>.gguf (vision encoder and projector, with the trained pixel bounds), made by
llama.cpp's own converter from the exported folder (export/gguf.py: the converter comes from the pinned
llama-cpp-python source distribution on PyPI, fetched once into ~/.cache/paddleocr-vl-manga, or
LLAMA_CPP_DIR). Their chat template renders llama.cpp's image marker where ours has the image, so
llama-mtmd-cli and llama-server prompt the model exactly as training did. --gguf_type: f16 (default) or
q8_0.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PaddleOCRVLForConditionalGeneration
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from paddleocr_vl_manga.data.collator import saved_pixel_bounds
from paddleocr_vl_manga.export.gguf import GGUF_TYPES, GGUFError, converter_dir, export_gguf
from paddleocr_vl_manga.model.output_vocabulary import OUTPUT_VOCABULARY_FILE

logger = logging.getLogger("export_model")  # the name before the move to paddleocr_vl_manga

# What transformers skips when loading the release (regexes searched in tensor names), from transformers.
NOT_LOADED = tuple(PaddleOCRVLForConditionalGeneration._keys_to_ignore_on_load_unexpected)
# Weight formats other than safetensors would still hold the base's weights: never carried over.
STAGING = ".export-partial"  # inside an existing --out, or `.<name>.export-partial` beside a new one
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".pdparams", ".gguf", ".onnx")
# Model and processor files that save_pretrained writes: removed from the output when the base has none.
SAVED_FILES = re.compile(
    r"(config|generation_config|processor_config|preprocessor_config|video_preprocessor_config|tokenizer"
    r"|tokenizer_config|special_tokens_map|added_tokens|chat_template)\.json|chat_template\.jinja"
    r"|tokenizer\.model|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)


# sft_paddleocr_vl.py writes this into every checkpoint: {"base_model": hub id or absolute folder}.
BASE_FILE = "base_model.json"


class ExportError(ValueError):
    """The checkpoint can't be exported against this base (printed as one `error: ...` line)."""


def write_base(folder: str | Path, base: str) -> None:
    """Record in `folder` the base it was trained from (a local folder as an absolute path)."""
    if Path(base).expanduser().is_dir():
        base = str(Path(base).expanduser().resolve())
    (Path(folder) / BASE_FILE).write_text(json.dumps({"base_model": base}) + "\n", encoding="utf-8")


def recorded_base(checkpoint: str | Path) -> str:
    """The base a checkpoint says it was trained from: base_model.json (sft), else a LoRA adapter's
    base_model_name_or_path; ExportError when it says neither."""
    ckpt = Path(checkpoint)
    for name, key in ((BASE_FILE, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        if (ckpt / name).is_file():
            try:
                base = json.loads((ckpt / name).read_text(encoding="utf-8")).get(key)
            except (json.JSONDecodeError, AttributeError) as e:
                raise ExportError(f"{ckpt / name} is not a JSON object: {e}") from e
            if isinstance(base, str) and base:
                # A folder recorded on another machine (or relative to another directory) would otherwise be
                # looked up on the hub as a repo id, with an error that does not say where it came from.
                if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
                    raise ExportError(f"{ckpt / name} names the base {base}, which is not a folder here (a "
                                      "checkpoint from another machine or directory?): pass --base")
                return base
    raise ExportError(f"{ckpt} does not say which base it was trained from (no {BASE_FILE} or LoRA "
                      "adapter_config.json with base_model_name_or_path): pass --base")


def base_folder(base: str) -> Path:
    """A local folder holding the base's top-level files (a hub id is resolved through the HF cache)."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    from huggingface_hub import HfApi, snapshot_download

    try:  # the repo's top-level files (sub-folders are not part of the model), no other weight formats
        names = [f for f in HfApi().list_repo_files(base) if "/" not in f and not f.endswith(OTHER_WEIGHTS)]
        return Path(snapshot_download(base, allow_patterns=names))
    except Exception as e:  # offline, or the hub unreachable: what training already downloaded
        logger.warning("could not list %s on the hub (%s); using the files in the local cache", base, e)
        try:
            return Path(snapshot_download(base, local_files_only=True))
        except Exception as e2:
            raise ExportError(
                f"base {base!r} is neither a folder nor a model in the local HF cache ({e2})"
            ) from e2


def weight_files(folder: Path) -> dict[str, list[str]]:
    """{safetensors file: its tensor names} from the index, or the single model.safetensors."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {file: _keys(folder / file) for file in files}
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return {SAFE_WEIGHTS_NAME: _keys(folder / SAFE_WEIGHTS_NAME)}
    raise ExportError(f"{folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _set_pixel_bounds(config: dict, min_pixels: int, max_pixels: int) -> None:
    """Write new bounds where the file keeps them: top-level min/max_pixels (the release) and/or `size`."""
    target = config.get("image_processor", config)  # processor_config.json nests the image processor
    if "min_pixels" in target or "max_pixels" in target:
        target.update(min_pixels=min_pixels, max_pixels=max_pixels)
    size = target.get("size")
    if isinstance(size, dict) and ("shortest_edge" in size or "longest_edge" in size):
        size.update(shortest_edge=min_pixels, longest_edge=max_pixels)
    elif not ("min_pixels" in target or "max_pixels" in target):
        target["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


Tensors = dict[str, tuple[tuple, torch.dtype]]  # name -> (shape, dtype)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_tensors(ckpt: Tensors, base: Tensors) -> None:
    """The checkpoint must hold every tensor of the base that transformers loads, with the same shapes."""
    extra = sorted(set(ckpt) - set(base))
    missing = sorted(k for k in set(base) - set(ckpt) if not any(re.search(p, k) for p in NOT_LOADED))
    shapes = sorted(k for k in set(ckpt) & set(base) if ckpt[k][0] != base[k][0])
    problems = []
    if extra:
        problems.append(f"it has {len(extra)} tensors the base does not (e.g. {extra[:3]})")
    if missing:
        problems.append(f"it lacks {len(missing)} tensors of the base (e.g. {missing[:3]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensors of other shapes (e.g. {k}: {ckpt[k][0]} vs {base[k][0]})")
    if problems:
        raise ExportError("the checkpoint does not match the base: " + "; ".join(problems)
                          + ". Was it fine-tuned from this base?")


def _shapes(folder: Path, files: dict[str, list[str]]) -> Tensors:
    out = {}
    for file, names in files.items():
        with safe_open(str(folder / file), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
    return out


def export_model(checkpoint: str | Path, base: str, out: str | Path) -> Path:
    """Write ``out`` as the base's folder with the checkpoint's weights (see the module docstring).

    ``out`` may be the checkpoint itself (the training script exports its final model in place); files are
    staged in a temporary folder inside ``out`` and moved at the end, so a failure leaves ``out`` as it was.
    """
    ckpt, out = Path(checkpoint), Path(out)
    if (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".merge-", dir=out) as merged:
            return export_model(merge_adapter(ckpt, base, Path(merged)), base, out)
    base_dir = base_folder(base)
    if ckpt.resolve() == base_dir.resolve():
        raise ExportError(f"checkpoint and base are the same folder: {ckpt}")
    base_files = weight_files(base_dir)
    ckpt_files = weight_files(ckpt)
    base_tensors, ckpt_tensors = _shapes(base_dir, base_files), _shapes(ckpt, ckpt_files)
    check_tensors(ckpt_tensors, base_tensors)
    where = {name: file for file, names in ckpt_files.items() for name in names}
    bounds, base_bounds = saved_pixel_bounds(ckpt), saved_pixel_bounds(base_dir)

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        names = sorted(p.name for p in base_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        for name in names:
            if name == OUTPUT_VOCABULARY_FILE:  # the base's own (a fine-tuned base): the checkpoint's below
                continue
            if name in base_files:
                _write_weights(staging / name, base_dir / name, base_files[name], ckpt, where)
            elif name.endswith(OTHER_WEIGHTS):
                logger.warning("not exporting %s: it holds the base's weights in another format", name)
            else:
                shutil.copyfile(base_dir / name, staging / name)
        if bounds and bounds != base_bounds:
            _write_pixel_bounds(staging, bounds)
        if (ckpt / OUTPUT_VOCABULARY_FILE).is_file():  # the tokens its labels used: inference's lm_head rows
            shutil.copyfile(ckpt / OUTPUT_VOCABULARY_FILE, staging / OUTPUT_VOCABULARY_FILE)
        move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def move_into(staging: Path, out: Path) -> None:
    """Move the files of `staging` into `out` (replacing), then remove what save_pretrained wrote into `out`
    that the staged export does not have (a model saved in place by training)."""
    carried = {p.name for p in staging.iterdir() if p.is_file()}
    for name in sorted(carried):
        os.replace(staging / name, out / name)
    for stale in out.iterdir():
        if stale.is_file() and SAVED_FILES.fullmatch(stale.name) and stale.name not in carried:
            stale.unlink()


def merge_adapter(ckpt: Path, base: str, dst: Path) -> Path:
    """Save base + the LoRA adapter in `ckpt`, merged, to `dst` (with the checkpoint's processor files)."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from paddleocr_vl_manga.model.loading import ModelLoadError, load_model_and_processor
    from paddleocr_vl_manga.model.lora import merge_lora

    try:
        model, _ = load_model_and_processor(base, dtype=torch.float32)
    except ModelLoadError as e:
        raise ExportError(str(e)) from e
    try:
        merged = merge_lora(PeftModel.from_pretrained(model, str(ckpt)))
    except (ValueError, RuntimeError, KeyError) as e:
        raise ExportError(f"the LoRA adapter in {ckpt} does not fit the base {base}: {e}") from e
    merged.save_pretrained(dst)
    AutoProcessor.from_pretrained(ckpt).save_pretrained(dst)
    if (ckpt / OUTPUT_VOCABULARY_FILE).is_file():
        shutil.copyfile(ckpt / OUTPUT_VOCABULARY_FILE, dst / OUTPUT_VOCABULARY_FILE)
    return dst


def _write_weights(dst: Path, base_file: Path, names: list[str], ckpt: Path, where: dict[str, str]) -> None:
    """One safetensors file with the base file's tensors, order and metadata: the trained values where the
    checkpoint has them (cast to the base's dtype), the base's bytes for the tensors transformers skips."""
    tensors = {}
    with ExitStack() as stack, safe_open(str(base_file), framework="pt") as f:
        opened = {}
        for name in names:
            if name not in where:
                tensors[name] = f.get_tensor(name)
                continue
            if where[name] not in opened:
                opened[where[name]] = stack.enter_context(safe_open(str(ckpt / where[name]), framework="pt"))
            tensors[name] = opened[where[name]].get_tensor(name).to(_DTYPES[f.get_slice(name).get_dtype()])
        metadata = f.metadata()
    try:
        save_file(tensors, str(dst), metadata=metadata)
    except SafetensorError as e:  # its I/O errors are not OSErrors: "I/O error: File too large (os error 27)"
        code = re.search(r"os error (\d+)", str(e))
        if not code:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(dst)) from None


def _write_pixel_bounds(staging: Path, bounds: tuple[int, int]) -> None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = staging / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            _set_pixel_bounds(config, *bounds)
            path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            break
    else:
        raise ExportError("the base has no preprocessor_config.json or processor_config.json to carry the "
                          f"trained pixel bounds {bounds}")
    if saved_pixel_bounds(staging) != bounds:
        raise ExportError(f"could not write the pixel bounds {bounds} into the base's {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint-N folder or a final model folder saved by training")
    parser.add_argument("--base", help="hub id or folder of the model that was fine-tuned (default: the one "
                        f"the checkpoint names in {BASE_FILE} or adapter_config.json)")
    parser.add_argument(
        "--out", required=True, help="new or empty folder for the export (or the checkpoint: in place)"
    )
    parser.add_argument("--gguf", action="store_true",
                        help="also write model-<type>.gguf and mmproj-<type>.gguf for llama.cpp into --out")
    parser.add_argument("--gguf_type", default="f16", choices=GGUF_TYPES,
                        help="weight type of both GGUF files (default f16; norms and biases stay f32)")
    # argparse's errors as one line, not its 15-line usage with the useful line last.
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists the flags)\n")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line printed) or --help
        return int(e.code or 0)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out, ckpt = Path(args.out), Path(args.checkpoint)
    try:
        if not ckpt.is_dir():
            raise ExportError(f"checkpoint folder {ckpt} does not exist")
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out} is a file, not a folder")
        in_place = out.exists() and out.resolve() == ckpt.resolve()
        if out.exists() and any(p.name != STAGING for p in out.iterdir()) and not in_place:
            raise ExportError(f"--out {out} exists and is not empty")
        if args.gguf:
            converter_dir(fetch=True)  # fails before the export if there is no converter (offline)
        if args.base and args.base.startswith(("/", ".", "~")) and not Path(args.base).expanduser().is_dir():
            raise ExportError(f"--base {args.base} is not a folder")  # a path, not a hub id: no hub lookup
        base = args.base or recorded_base(ckpt)
        written = export_whole(ckpt, base, out, args.gguf_type if args.gguf else None, in_place=in_place)
    except (ExportError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {write_failed(e.filename or out, e)}", file=sys.stderr)
        return 2
    print(*written, sep="\n")
    return 0


def export_whole(ckpt: Path, base: str, out: Path, gguf_type: str | None, *, in_place: bool) -> list[Path]:
    """The export (and its GGUF files) written whole or not at all: made in a staging folder beside a new
    `out` or inside an existing one (same file system, so the last step is a rename), then moved into place.
    A failure anywhere, a failed GGUF conversion or a full disk included, leaves `out` as it was, so the same
    command can simply be run again; a killed run's staging folder is removed by the next run."""
    target = out.resolve()  # `--out .` has no name of its own to put the staging folder beside
    # A folder that exists (empty, the checkpoint, or `--out .`) stays and its files are moved in, staged
    # inside it: it may be a mount point (a Docker volume, a USB drive), which rmdir() refuses ("Device or
    # resource busy") and whose parent is another file system, where os.replace() cannot reach it.
    fill_in = in_place or target.is_dir()
    if fill_in:
        staging = target / STAGING
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}{STAGING}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir()
    try:
        export_model(ckpt, base, staging)
        ggufs = list(export_gguf(staging, staging, gguf_type, name=target.name)) if gguf_type else []
        if fill_in:
            move_into(staging, target)
        else:
            os.rename(staging, target)
    except OSError as e:  # name the file the user will look for, not its staging copy
        where = Path(e.filename) if e.filename else None
        if where is not None and staging in where.parents:
            raise OSError(e.errno, e.strerror, str(out / where.name)) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out, *(out / p.name for p in ggufs)]


def write_failed(path: str | Path, e: OSError) -> str:
    """One line for an OSError while writing `path`: full disk and size limits named as such."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"could not write {path}: the disk is full or a file-size limit (ulimit -f) stopped the "
                f"write ({e.strerror}); nothing was exported: make room and run the same command again")
    return f"{path}: {e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
