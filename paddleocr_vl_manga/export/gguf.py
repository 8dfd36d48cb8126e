"""GGUF files for llama.cpp from an exported model folder (export_model.py --gguf), made by llama.cpp's own
converter.

    from paddleocr_vl_manga.export.gguf import export_gguf
    model_gguf, mmproj_gguf = export_gguf("./ft-2000", "./ft-2000", "q8_0")

The converter is not copied into this repo: it comes from the source distribution of llama-cpp-python on PyPI
(pinned below), which vendors llama.cpp with convert_hf_to_gguf.py, its model classes (conversion/) and the
matching gguf library (gguf-py/). `make setup` (or the first --gguf export) downloads it once into
~/.cache/paddleocr-vl-manga/llama.cpp-<pin>; LLAMA_CPP_DIR points at any other llama.cpp checkout instead.

The converter reads the exported folder through a staging folder of links that changes only what llama.cpp
needs differently from transformers (the exported folder itself stays the base's, loadable by transformers):

- the chat template: the release's renders the image as `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`,
  which llama.cpp's mtmd never sees: it looks for its media marker (`<__media__>`, or the marker llama-server
  puts into the message text) and inserts `<|IMAGE_START|>` + the image embeddings + `<|IMAGE_END|>` there.
  With the released template llama-server fails with "number of bitmaps (1) does not match number of markers
  (0)" (llama.cpp PR #19799, PaddleOCR PR #17729). Ours renders the marker, and the prompt it renders, with
  the marker replaced by what mtmd inserts, is our training prompt (data.collator.generation_prompt);
- tokenizer_config.json: `add_bos_token` and `add_prefix_space` as transformers tokenizes the training prompt
  (llama.cpp's SentencePiece defaults are the opposite: a `<s>` first and a "▁" after every special token),
  and every added token (the converter names and types the ids above the SentencePiece pieces, the image
  markers among them, only from this file's `added_tokens_decoder`);
- preprocessor_config.json: top-level min_pixels/max_pixels (the mmproj's pixel bounds) as the exported
  processor resizes, wherever the export keeps them;
- config.json: `vision_config.architectures` = PaddleOCRVisionModel when missing (the converter picks its
  mmproj class by it; the release has it, a config saved by transformers does not).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger("ocr_gguf")  # the name before the move to paddleocr_vl_manga

# llama-cpp-python 0.3.36 vendors a llama.cpp whose converter knows PaddleOCR-VL (PaddleOCRModel and the
# mmproj PaddleOCRVisionModel with the image processor's pixel bounds). The converter needs sentencepiece (it
# reads the release's tokenizer.model); the version is in the range of the converter's own requirements file.
LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER_DEPS = ("sentencepiece==0.2.1",)
GGUF_TYPES = ("f16", "q8_0")
ARCHITECTURE = "PaddleOCRVLForConditionalGeneration"  # what a converter must register to convert our models
VISION_ARCHITECTURE = "PaddleOCRVisionModel"  # the converter's mmproj class for PaddleOCR-VL
# convert_hf_to_gguf.py names the projector's linear_1/linear_2 like encoder blocks 1 and 2 ("Can not map
# tensor 'mlp_AR.linear_2.bias'" with 2 encoder layers).
MIN_VISION_LAYERS = 3
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker() in llama.cpp's tools/mtmd/mtmd.cpp
# What the converter needs from the sdist's vendor/llama.cpp (the rest is C++ sources).
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")


class GGUFError(ValueError):
    """The GGUF files can't be made (printed as one `error: ...` line)."""


def default_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "paddleocr-vl-manga" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def converter_dir(fetch: bool = False) -> Path:
    """The llama.cpp folder whose convert_hf_to_gguf.py converts PaddleOCR-VL: LLAMA_CPP_DIR if set, else the
    cache (downloaded first when `fetch`). Raises GGUFError when there is none or it lacks PaddleOCR-VL."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return check_converter(Path(os.environ["LLAMA_CPP_DIR"]).expanduser())
    cache = default_cache()
    if not (cache / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        if not fetch:
            raise GGUFError(f"llama.cpp's converter is not in {cache}: run `make setup` (or python -m "
                            "paddleocr_vl_manga.export.gguf --fetch), or set LLAMA_CPP_DIR to a llama.cpp "
                            "checkout")
        try:
            fetch_converter(cache)
        except OSError as e:  # e.g. no write access to ~/.cache: say how to put the converter elsewhere
            raise GGUFError(f"could not write llama.cpp's converter into {cache} ({e}): set XDG_CACHE_HOME "
                            "to a writable folder, or LLAMA_CPP_DIR to a llama.cpp checkout") from e
    return check_converter(cache / "llama.cpp")


def check_converter(llama_cpp: Path) -> Path:
    """`llama_cpp` if its converter registers PaddleOCR-VL, else GGUFError."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise GGUFError(f"{llama_cpp} has no convert_hf_to_gguf.py: not a llama.cpp checkout")
    # Newer converters keep a name -> module table in conversion/__init__.py; older ones register every
    # class in the script itself.
    sources = [script, *sorted((llama_cpp / "conversion").glob("*.py"))]
    if not any(f'"{ARCHITECTURE}"' in p.read_text(encoding="utf-8") for p in sources):
        raise GGUFError(f"the converter in {llama_cpp} does not know PaddleOCR-VL ({ARCHITECTURE} is not "
                        f"registered): use llama-cpp-python=={LLAMA_CPP_PYTHON}'s (unset LLAMA_CPP_DIR) or a "
                        "newer llama.cpp checkout")
    return llama_cpp


def download_sdist(dest: Path) -> Path:
    """The pinned llama-cpp-python source distribution (it vendors llama.cpp), downloaded by pip into dest."""
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
    logger.info("downloading %s's source distribution (~75 MB) for llama.cpp", spec)
    _pip(["download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(dest)], spec)
    return next(Path(dest).glob("*.tar.gz"))


def extract_llama_cpp(sdist: Path, dest: Path, parts: tuple[str, ...] | None = None) -> Path:
    """Unpack the sdist's vendor/llama.cpp (only these top-level `parts` when given) as `dest`: regular files
    and folders only, no name leaving the tree (what tarfile's "data" filter enforces, on every Python)."""
    prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):]
            if not (m.name.startswith(prefix) and (m.isfile() or m.isdir()) and rel):
                continue
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise GGUFError(f"{sdist.name} holds an unsafe path {m.name!r}")
            if parts is None or rel.split("/")[0] in parts:
                m.name = rel
                members.append(m)
        tar.extractall(dest, members=members)
    return dest


def _pip(args: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GGUFError(f"could not download {what} with pip (offline?): {last}")


def fetch_converter(cache: Path) -> Path:
    """Download the pinned llama-cpp-python sdist with pip and keep only the converter's files (and its
    Python dependencies, in `site/`) in `cache`."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache.parent) as tmp:
        sdist = download_sdist(Path(tmp))
        deps = list(CONVERTER_DEPS)
        _pip(["install", "--no-deps", "--target", f"{tmp}/stage/site", *deps], " ".join(deps))
        check_converter(extract_llama_cpp(sdist, Path(tmp) / "stage" / "llama.cpp", CONVERTER_PARTS))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(Path(tmp) / "stage", cache)
    return cache


def gguf_chat_template(training_prompt: str, eos_token: str) -> str:
    """A chat template for llama.cpp whose generation prompt for an image and the OCR prompt, once mtmd puts
    the image (with its start/end markers) where the media marker is, is `training_prompt`.

    The release's layout: cls, "User: ", the images, then the texts, "\\n", the assistant prefix. Message
    content may be a string (llama-cli, and llama-server once media are in it, give "<marker>OCR:") or typed
    parts: "text" and llama-server's "media_marker" parts carry their text, HF-style "image" parts become
    mtmd's default marker.
    """
    from paddleocr_vl_manga.data.collator import BOS_TEXT, IMAGE_TRIPLET, PROMPT

    head, tail = f"{BOS_TEXT}User: {IMAGE_TRIPLET}", f"{PROMPT}\n"
    if not (training_prompt.startswith(head + tail) and len(training_prompt) > len(head + tail)):
        raise GGUFError(f"unexpected training prompt {training_prompt!r}: it should start {head + tail!r}")
    assistant = training_prompt[len(head + tail):]

    def lit(text: str) -> str:  # a Jinja string literal (json escapes are Jinja's escapes)
        return json.dumps(text, ensure_ascii=False)

    return f"""{{#- Made by export_model.py --gguf: the release's layout with llama.cpp's media marker. -#}}
{{%- if not add_generation_prompt is defined -%}}
    {{%- set add_generation_prompt = false -%}}
{{%- endif -%}}
{{{{- {lit(BOS_TEXT)} -}}}}
{{%- for message in messages -%}}
    {{%- if message["role"] == "user" -%}}
        {{{{- "User: " -}}}}
    {{%- elif message["role"] == "assistant" -%}}
        {{{{- {lit(assistant)} -}}}}
    {{%- endif -%}}
    {{%- if message["content"] is string -%}}
        {{{{- message["content"] -}}}}
    {{%- else -%}}
        {{%- for part in message["content"] -%}}
            {{%- if part["type"] == "image" -%}}
                {{{{- {lit(MEDIA_MARKER)} -}}}}
            {{%- elif part["type"] == "media_marker" -%}}
                {{{{- part["text"] -}}}}
            {{%- endif -%}}
        {{%- endfor -%}}
        {{%- for part in message["content"] -%}}
            {{%- if part["type"] == "text" -%}}
                {{{{- part["text"] -}}}}
            {{%- endif -%}}
        {{%- endfor -%}}
    {{%- endif -%}}
    {{%- if message["role"] == "assistant" -%}}
        {{{{- {lit(eos_token)} -}}}}
    {{%- else -%}}
        {{{{- "\\n" -}}}}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}
    {{{{- {lit(assistant)} -}}}}
{{%- endif -%}}
"""


def training_prompt(export_dir: Path):
    """(the generation prompt training used, the processor) of an exported folder, loaded as training does."""
    from paddleocr_vl_manga.data.collator import PromptError, generation_prompt
    from paddleocr_vl_manga.model.loading import ModelLoadError, load_config_and_processor

    try:
        processor = load_config_and_processor(str(export_dir)).processor
        return generation_prompt(processor), processor
    except (ModelLoadError, PromptError) as e:
        raise GGUFError(str(e)) from e


def _converter_input(export_dir: Path, stage: Path) -> Path:
    """`stage` filled with links to the exported files, and llama.cpp's versions of the few files listed in
    the module docstring."""

    if not (export_dir / "tokenizer.model").is_file():
        # The export carries the base's files, so the base lacks it: a folder written by save_pretrained
        # (transformers 5 writes tokenizer.json only), or a tiny stand-in made without it.
        raise GGUFError("the base has no tokenizer.model, the SentencePiece vocabulary llama.cpp's converter "
                        "reads: use a base that has the release's files (the hub's PaddlePaddle/PaddleOCR-VL "
                        "does, and so does a stand-in made by tools/make_tiny_model.py --release_like v1)")
    vision_layers = json.loads((export_dir / "config.json").read_text(encoding="utf-8")).get(
        "vision_config", {}).get("num_hidden_layers", MIN_VISION_LAYERS)
    if vision_layers < MIN_VISION_LAYERS:
        raise GGUFError(f"the model's vision encoder has {vision_layers} layers; llama.cpp's converter "
                        "maps the projector's mlp_AR.linear_1/2 through the encoder's per-layer table, so it "
                        f"needs at least {MIN_VISION_LAYERS} (the release has 27; a tiny stand-in: "
                        "tools/make_tiny_model.py --release_like v1 makes 3)")
    prompt, processor = training_prompt(export_dir)
    tok = processor.tokenizer
    rewritten = {"chat_template.jinja", "chat_template.json", "tokenizer_config.json", "config.json",
                 "preprocessor_config.json", "processor_config.json"}
    stage.mkdir()
    for path in export_dir.iterdir():
        if path.is_file() and path.name not in rewritten and not path.name.endswith(".gguf"):
            (stage / path.name).symlink_to(path.resolve())

    def read(name: str) -> dict:
        path = export_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    (stage / "chat_template.jinja").write_text(gguf_chat_template(prompt, tok.eos_token), encoding="utf-8")
    tokenizer_config = read("tokenizer_config.json")
    tokenizer_config.pop("chat_template", None)  # the converter prefers it to chat_template.jinja
    ids = tok("User", add_special_tokens=True)["input_ids"]
    tokenizer_config["add_bos_token"] = bool(ids) and ids[0] == tok.bos_token_id
    pieces = tok.convert_ids_to_tokens(tok("User", add_special_tokens=False)["input_ids"])
    tokenizer_config["add_prefix_space"] = pieces[0].startswith("▁")
    # The converter types and names the tokens above the SentencePiece pieces (the image markers) only from
    # added_tokens_decoder, which a tokenizer_config.json saved by transformers 5 no longer lists.
    tokenizer_config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "special": t.special} for i, t in tok.added_tokens_decoder.items()
    }
    _write_json(stage / "tokenizer_config.json", tokenizer_config)

    config = read("config.json")
    vision = config.get("vision_config")
    if isinstance(vision, dict) and not vision.get("architectures"):
        vision["architectures"] = [VISION_ARCHITECTURE]
    _write_json(stage / "config.json", config)

    from paddleocr_vl_manga.data.collator import saved_pixel_bounds

    bounds = saved_pixel_bounds(export_dir)
    if bounds is None:
        raise GGUFError(f"{export_dir} has no image processor config with pixel bounds")
    image_processor = (read("preprocessor_config.json")
                       or read("processor_config.json").get("image_processor", {}))
    image_processor.update(min_pixels=bounds[0], max_pixels=bounds[1])
    _write_json(stage / "preprocessor_config.json", image_processor)
    return stage


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def export_gguf(
    export_dir: str | Path, out_dir: str | Path, gguf_type: str = "f16", llama_cpp: Path | None = None,
    name: str | None = None,
) -> tuple[Path, Path]:
    """Convert an exported model folder (the base's layout) to `out_dir`/model-<type>.gguf (the language
    model) and `out_dir`/mmproj-<type>.gguf (vision encoder and projector), both at `gguf_type`.

    `name`: the folder name the GGUF's general.name is made from (default: `export_dir`'s; export_model
    passes the final folder's, since it converts in a staging folder)."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf_type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    llama_cpp = check_converter(llama_cpp) if llama_cpp else converter_dir(fetch=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = (out_dir / f"model-{gguf_type}.gguf", out_dir / f"mmproj-{gguf_type}.gguf")
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir) as tmp:
        # The folder's name becomes the GGUF's general.name.
        stage = _converter_input(export_dir, Path(tmp) / (name or export_dir.resolve().name))
        for target, extra in zip(outputs, ([], ["--mmproj"]), strict=True):
            partial = Path(tmp) / target.name
            run_converter(llama_cpp, [str(stage), "--outtype", gguf_type, "--outfile", str(partial), *extra])
            os.replace(partial, target)
    return outputs


def run_converter(llama_cpp: Path, args: list[str]) -> None:
    """convert_hf_to_gguf.py `args` with this Python; its log on failure goes into the GGUFError."""
    env = dict(os.environ)
    site = default_cache() / "site"  # the converter's dependencies (fetch_converter), also for LLAMA_CPP_DIR
    paths = [str(p) for p in (llama_cpp / "gguf-py", site) if p.is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, not an installed gguf of another version
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), *args]
    logger.info("running %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        log = (done.stderr + done.stdout).strip().splitlines()
        # The tensors are written by numpy's tofile(), whose short write says "3309568 requested and 504368
        # written" without an errno; the header and metadata by Python ("[Errno 28] No space left").
        codes = "|".join(str(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
        no_room = re.compile(rf"\[Errno ({codes})\]|requested and \d+ written")
        if any(no_room.search(line) for line in log[-5:]):
            outfile = Path(args[args.index("--outfile") + 1]).name
            raise GGUFError(f"llama.cpp's converter could not write {outfile}: the disk is full or a "
                            "file-size limit (ulimit -f) stopped the write; make room and run the same "
                            "command again")
        # The traceback's last line, not the progress bar tqdm prints after it ("Writing:   0%| ...").
        errors = [line for line in log if re.match(r"[\w.]+(Error|Exception)\b", line)]
        shown = errors[-1] if errors else log[-1] if log else "no output"
        raise GGUFError(f"llama.cpp's converter failed ({' '.join(cmd)}): {shown}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch llama.cpp's converter into the cache (make setup).")
    parser.add_argument("--fetch", action="store_true",
                        help=f"download llama-cpp-python=={LLAMA_CPP_PYTHON}'s converter unless it is cached")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        print(converter_dir(fetch=args.fetch))
    except GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
