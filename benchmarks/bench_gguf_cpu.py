"""The exported GGUF in llama.cpp on CPU: does it read like ours, and is it faster than our PyTorch path?

    python benchmarks/bench_gguf_cpu.py                    # build llama.cpp if needed, check, time 6 crops
    python benchmarks/bench_gguf_cpu.py --check_only       # only the tiny model's greedy text, both ways
    python benchmarks/bench_gguf_cpu.py --threads 2 --num_samples 4 --gguf_types q8_0 f16
    python benchmarks/bench_gguf_cpu.py --no_build         # fail instead of compiling llama.cpp

llama.cpp: llama-mtmd-cli, compiled once (20 minutes on 2 busy cores; never in CI) from the source that
llama-cpp-python==export.gguf.LLAMA_CPP_PYTHON vendors (the same pin the converter comes from), into
~/.cache/paddleocr-vl-manga/llama.cpp-<pin>-build/ (build/bin/llama-mtmd-cli, its log in build.log) and reused
from there. LLAMA_MTMD_CLI names another llama-mtmd-cli binary instead; --llama_cpp_src an unpacked llama.cpp
source to build from instead of downloading the sdist with pip. The GGUFs come from export_gguf (what
export_model.py --gguf writes), converted from a folder in the release's layout.

1. check (the tiny release-like model, random weights, 3 vision layers as the converter needs, f16 GGUF: the
   closest llama.cpp comes to our fp32): greedy text of a few crops from ours (the prompt from our
   processor, generate() with do_sample=False) and from llama-mtmd-cli (--temp 0, the GGUF's chat
   template, `-p` our prompt text), exactly --max_new_tokens each (ours min_new_tokens, llama.cpp
   --ignore-eos), on crops from synthetic full-size pages. Random weights at the default init give
   near-ties everywhere, so the tiny model is drawn with larger weights (init std 0.1, vision 0.2, as
   tests/model/test_quantize.py does) and its lm_head keeps only the rows of the synthetic charset's
   characters
   (the others zeroed, as bench_eval.full_size_random zeroes ids past the tokenizer): every greedy token is a
   character, and the texts say where the two implementations part. The prompt llama.cpp built is checked
   too (llama-mtmd-cli -v logs it): our generation prompt with llama.cpp's media marker for the image.
   llama.cpp reads every crop twice, as it is and already resized to our processor's size (check_tiny):
   its own bicubic resize is not PIL's, and the second reading compares the models on the same pixels.
2. timing (the full-size 0.9B architecture, random weights, benchmarks/full_size.py via bench_eval): per crop
   at batch 1, all rows in one process on the same crops, taking turns crop by crop (bench_compat_cpu's
   time_interleaved): manga-ocr's architecture (greedy, 4 beams), ours fp32 and int8 through MangaOcr, and
   llama.cpp at each --gguf_types. llama-mtmd-cli runs once per crop, a new process each time; its per-crop
   figure is what its own log reports for that crop, as a tool keeping the model loaded (llama-server) pays:
     vision   "mtmd batch encoding done in N ms" (the vision encoder and projector)
     prefill  "prompt eval time" less the encode, which that clock spans (LlamaTiming.prefill): the prompt
              text and the image embeddings through the language model
     decode   "eval time": 15 forwards for 16 tokens, as ours
     other    the rest of the call once loaded (from its "experimental CLI" warning, logged after loading,
              to its perf report, by the log's timestamps): reading and resizing the image, sampling
   The seconds of the whole llama-mtmd-cli call (process start, loading both GGUFs, warm-up, the work above)
   are printed beside it as "process s": what a tool pays that starts the CLI per crop.
Threads: torch.set_num_threads and llama.cpp's -t/-tb both get --threads (default: physical cores).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_compat_cpu import (  # noqa: E402
    FP32,
    Plan,
    Row,
    Split,
    Variant,
    _quantized,
    crops,
    manga_ocr_plans,
    ours_plans,
    physical_cores,
    time_interleaved,
)
from benchmarks.bench_eval import full_size_random  # noqa: E402
from paddleocr_vl_manga.data.collator import (  # noqa: E402
    IMAGE_TRIPLET,
    configure_image_size,
    generation_prompt,
    num_image_tokens,
)
from paddleocr_vl_manga.data.dataset import PROMPT  # noqa: E402
from paddleocr_vl_manga.export.gguf import (  # noqa: E402
    GGUF_TYPES,
    MEDIA_MARKER,
    GGUFError,
    default_cache,
    download_sdist,
    export_gguf,
    extract_llama_cpp,
)
from paddleocr_vl_manga.model.generation import ImageList, crop_chunks  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET  # noqa: E402
from tools.make_tiny_model import RELEASES, build_release_like, save_release_layout  # noqa: E402

CLI = "llama-mtmd-cli"
RELEASE_BUDGET = RELEASES["v1"][1:]  # (min_pixels, max_pixels) of the v1 release's image processor


class BenchError(RuntimeError):
    """What stops the benchmark, printed as one `error: ...` line."""


# ---------------------------------------------------------------- llama.cpp, built once into the cache


def build_cache() -> Path:
    """Where llama.cpp is built: beside the converter's cache, under the same pin."""
    converter = default_cache()
    return converter.with_name(converter.name + "-build")


def mtmd_cli(build: bool, source: Path | None = None) -> Path:
    """The llama-mtmd-cli to run: $LLAMA_MTMD_CLI, else the cached build, compiled first when `build`."""
    if os.environ.get("LLAMA_MTMD_CLI"):
        path = Path(os.environ["LLAMA_MTMD_CLI"]).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BenchError(f"LLAMA_MTMD_CLI={path} is not an executable file")
        return path
    cache = build_cache()
    binary = cache / "build" / "bin" / CLI
    if binary.is_file():
        return binary
    if not build:
        raise BenchError(f"{CLI} is not built in {cache}: run without --no_build to compile llama.cpp there "
                         "(several minutes), or set LLAMA_MTMD_CLI to a llama-mtmd-cli binary")
    return build_llama_cpp(cache, source)


def fetch_source(cache: Path) -> Path:
    """llama.cpp's source as vendored in the pinned llama-cpp-python sdist (pip download), into cache/src."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        print("downloading llama-cpp-python's source distribution (~75 MB) for llama.cpp", file=sys.stderr)
        extract_llama_cpp(download_sdist(Path(tmp)), Path(tmp) / "src")
        shutil.rmtree(cache / "src", ignore_errors=True)
        os.replace(Path(tmp) / "src", cache / "src")
    return cache / "src"


def build_llama_cpp(cache: Path, source: Path | None = None) -> Path:
    """Configure and compile only llama-mtmd-cli (CPU backend, -march=native) into cache/build."""
    if source is None:
        source = cache / "src" if (cache / "src" / "CMakeLists.txt").is_file() else fetch_source(cache)
    if not (source / "tools" / "mtmd").is_dir():
        raise BenchError(f"{source} is not a llama.cpp source tree with tools/mtmd")
    if not shutil.which("cmake"):
        raise BenchError("cmake is not installed: it is needed to build llama.cpp (and a C++17 compiler)")
    log = cache / "build.log"
    configure = ["cmake", "-S", str(source), "-B", str(cache / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    compile_ = ["cmake", "--build", str(cache / "build"), "--target", CLI, "-j", str(physical_cores())]
    print(f"building {CLI} into {cache} (several minutes; log: {log})", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        for cmd in (configure, compile_):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                raise BenchError(f"building llama.cpp failed ({' '.join(cmd[:3])} ...): {tail} (see {log})")
    print(f"built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return cache / "build" / "bin" / CLI


# ---------------------------------------------------------------- one llama-mtmd-cli call per crop


@dataclass
class LlamaTiming:
    """What one llama-mtmd-cli call's log (-lv 4) reports, seconds."""

    ready: float  # from its start to the model, the mmproj and their warm-ups loaded
    work: float  # from then to the answer: image read and resized, encode, prefill, decode, sampling
    encode: float  # vision encoder + projector
    prompt_eval: float  # llama_perf's "prompt eval time": see prefill
    prompt_tokens: int
    eval: float  # one forward per generated token after the first
    eval_runs: int
    image_tokens: int

    @property
    def prefill(self) -> float:
        """The prompt text and image embeddings through the language model. libllama's prompt-eval clock
        starts at the first text chunk's llama_decode, which is not synchronized before mtmd encodes the
        image, and stops when the image embeddings' decode is: it spans the encode, taken out here."""
        return max(self.prompt_eval - self.encode, 0.0)


# The log lines at the pinned llama.cpp (timestamps "M.SS.mmm.uuu" since the log started).
_STAMP = r"^(\d+)\.(\d+)\.(\d+)\.(\d+) \w "
_READY = _STAMP + r"WARN: This is an experimental CLI"  # logged once loading is done, before the image
_PERF = _STAMP + r"llama_perf_context_print:"  # logged once the answer is done
_PATTERNS = {
    "encode": r"mtmd batch encoding done in (\d+) ms",
    "image_tokens": r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)",
    "prompt": r"llama_perf_context_print: prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens",
    "eval": r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs",
}


def _stamp(match: re.Match) -> float:
    minutes, seconds, ms, us = (int(g) for g in match.groups()[:4])
    return minutes * 60 + seconds + ms / 1e3 + us / 1e6


def parse_log(log: str) -> LlamaTiming:
    """The timings llama-mtmd-cli logs at -lv 4; BenchError names a missing line."""
    found: dict[str, Any] = {}
    for key, pattern in (("ready", _READY), ("perf", _PERF), *_PATTERNS.items()):
        hits = (list(re.finditer(pattern, log, re.M)) if key in ("ready", "perf")
                else re.findall(pattern, log))
        if not hits:
            raise BenchError(f"{CLI}'s log has no {pattern!r}: not the pinned llama.cpp, or the call failed")
        found[key] = hits
    ready, done = _stamp(found["ready"][0]), _stamp(found["perf"][0])
    return LlamaTiming(
        ready=ready, work=done - ready,
        encode=sum(int(ms) for ms in found["encode"]) / 1e3,
        prompt_eval=float(found["prompt"][-1][0]) / 1e3, prompt_tokens=int(found["prompt"][-1][1]),
        eval=float(found["eval"][-1][0]) / 1e3, eval_runs=int(found["eval"][-1][1]),
        image_tokens=sum(int(n) for n in found["image_tokens"]),
    )


class LlamaCli:
    """`runner(crop) -> text`: llama-mtmd-cli greedy on one crop; also bench_compat_cpu's clock for its row
    (split() returns what the call's log reported, see the module docstring)."""

    def __init__(self, binary: Path, model: Path, mmproj: Path, *, threads: int, max_new_tokens: int,
                 workdir: Path) -> None:
        self.binary, self.model, self.mmproj = binary, model, mmproj
        self.threads, self.max_new_tokens, self.workdir = threads, max_new_tokens, workdir
        self.timings: list[LlamaTiming] = []
        self.log = ""

    def command(self, image: Path, verbose: bool = False) -> list[str]:
        # --temp 0: greedy; --ignore-eos: exactly -n tokens, as our min_new_tokens; -p: our prompt text, which
        # the GGUF's chat template (--jinja: it is no built-in one) puts after the image marker, as our
        # template does; -c: the largest crops (the release's max_pixels / 28^2 = 3,600 image tokens) and the
        # answer; -lv 4: the timings (libllama's info lines), -v: also the prompt (debug lines).
        return [str(self.binary), "-m", str(self.model), "--mmproj", str(self.mmproj), "--image", str(image),
                "-p", PROMPT, "-n", str(self.max_new_tokens), "--temp", "0", "-t", str(self.threads),
                "-tb", str(self.threads), "-c", "4096", "-lv", "4", "--jinja", "--ignore-eos",
                "--no-mmproj-offload", *(["-v"] if verbose else [])]

    def run(self, img: Image.Image, verbose: bool = False) -> tuple[str, str]:
        """(generated text, the call's log)."""
        path = self.workdir / "crop.png"  # PNG: the pixels our processor gets, losslessly
        img.convert("RGB").save(path)
        done = subprocess.run(self.command(path, verbose), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        log = done.stderr + done.stdout
        if done.returncode:
            tail = " | ".join(log.strip().splitlines()[-3:])
            raise BenchError(f"{CLI} failed (exit {done.returncode}) on {self.model.name}: {tail}")
        return done.stdout, log

    def __call__(self, img: Image.Image) -> str:
        text, self.log = self.run(img)
        self.timings.append(parse_log(self.log))
        return generated_text(text)

    # bench_compat_cpu.Clock's interface
    def reset(self) -> None:
        pass

    def split(self, wall: float) -> Split:
        t = self.timings[-1]
        other = max(t.work - t.encode - t.prefill - t.eval, 0.0)
        return Split(t.encode, t.prefill, t.eval, other, t.eval_runs + 1)


def generated_text(stdout: str) -> str:
    """The answer in llama-mtmd-cli's stdout (it prints only the generated pieces there, then blank lines)."""
    return stdout.strip("\n")


# ---------------------------------------------------------------- 1. the check on the tiny model


def tiny_model(out: Path, seed: int) -> Path:
    """The tiny release-like model (with tokenizer.model for the converter), its lm_head cut to the
    synthetic charset's characters (see the module docstring)."""
    # Three vision layers at least: the converter maps the projector's mlp_AR.linear_{1,2} through block
    # numbers below the vision depth, so with two layers it cannot name linear_2.
    build_release_like(out, "v1", seed=seed, vision_layers=3, init_std=0.1, vision_init_std=0.2,
                       sentencepiece_model=True)
    _, processor = load_model_and_processor(str(out), dtype=torch.float32)
    tok = processor.tokenizer
    keep = sorted({i for c in CHARSET if (i := tok.convert_tokens_to_ids(c)) not in (None, tok.unk_token_id)})
    weights = load_file(str(out / "model.safetensors"))
    mask = torch.zeros(weights["lm_head.weight"].shape[0], 1, dtype=torch.bool)
    mask[keep] = True
    weights["lm_head.weight"] = weights["lm_head.weight"] * mask
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@torch.inference_mode()
def our_greedy(model: Any, processor: Any, img: Image.Image, max_new_tokens: int) -> str:
    """Our greedy answer of exactly max_new_tokens tokens, prompt and pixels from our processor (crop_chunks),
    without generate_readings' loop guard, which would cut a repeating tail llama.cpp keeps."""
    chunk = next(crop_chunks(processor, ImageList([img]), batch_size=1))
    _, batch = next(chunk.batches)
    n_prompt = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, n_prompt:], skip_special_tokens=True)


def our_size(processor: Any, img: Image.Image) -> tuple[int, int]:
    """(width, height) our image processor resizes `img` to (its patch grid times the patch size)."""
    ip = processor.image_processor
    _, h, w = ip(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
    return w * ip.patch_size, h * ip.patch_size


def first_difference(x: str, y: str) -> int | None:
    """0-based index of the first character where x and y differ (None: equal)."""
    if x == y:
        return None
    return next((k for k, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))


def check_tiny(binary: Path, images: list[Image.Image], a: argparse.Namespace, work: Path) -> bool:
    """Greedy text of ours and llama.cpp on `images` with the tiny model, printed; True if llama.cpp built our
    prompt (the texts are reported, not judged: f16 against fp32 may flip a near-tie of the random model).

    Each crop is read twice by llama.cpp: as it is (llama.cpp resizes it with its own bicubic filter) and
    already resized to our processor's size with PIL's bicubic filter, as our processor does (llama.cpp then
    keeps it as it is): the second isolates the model (f16 GGUF against our fp32) from the resizing."""
    folder = tiny_model(work / "tiny", a.seed)
    model, processor = load_model_and_processor(str(folder), dtype=torch.float32)
    gguf, mmproj = export_gguf(folder, work / "tiny-gguf", "f16")
    llama = LlamaCli(binary, gguf, mmproj, threads=a.threads, max_new_tokens=a.max_new_tokens, workdir=work)

    # The prompt llama.cpp built, from its debug log: ours, with the media marker where our image triplet is.
    _, log = llama.run(images[0], verbose=True)
    built = re.search(r"formatted_chat\.prompt: (.*?)\n\d+\.\d+\.\d+\.\d+ \w ", log, re.S)
    expected = generation_prompt(processor).replace(IMAGE_TRIPLET, MEDIA_MARKER)
    prompt_ok = built is not None and built.group(1) == expected
    print(f"\ncheck: tiny release-like model, f16 GGUF, {len(images)} crops, {a.max_new_tokens} greedy "
          "tokens each (ours fp32)")
    print(f"prompt llama.cpp built: {built.group(1) if built else None!r}\nours, image as the marker: "
          f"{expected!r} -> {'same' if prompt_ok else 'DIFFERENT'}")
    same = same_pixels = 0
    for i, img in enumerate(images):
        ours = our_greedy(model, processor, img, a.max_new_tokens)
        size = our_size(processor, img)
        as_is = llama(img)
        tokens = llama.timings[-1].image_tokens
        resized = llama(img.convert("RGB").resize(size, Image.Resampling.BICUBIC))
        d1, d2 = first_difference(ours, as_is), first_difference(ours, resized)
        same, same_pixels = same + (d1 is None), same_pixels + (d2 is None)
        ours_tokens = size[0] * size[1] // (processor.image_processor.patch_size * 2) ** 2
        print(f"crop {i + 1}: {img.width}x{img.height} -> ours {size[0]}x{size[1]} ({ours_tokens} image "
              f"tokens), llama.cpp {tokens} image tokens")
        for name, text, d in (("ours", ours, None), ("llama.cpp, crop as is", as_is, d1),
                              ("llama.cpp, crop at our size", resized, d2)):
            verdict = ("" if name == "ours" else " (same)" if d is None
                       else f" (differs from character {d + 1})")
            print(f"  {name:28s} {text!r}{verdict}")
    n = len(images)
    print(f"greedy text identical to ours: {same_pixels}/{n} crops given our resized pixels, {same}/{n} "
          f"crops as they are; prompt {'same' if prompt_ok else 'DIFFERENT'}")
    return prompt_ok


# ---------------------------------------------------------------- 2. timing the full-size architecture


def full_size_ggufs(base: Any, processor: Any, a: argparse.Namespace, work: Path) -> dict[tuple, tuple]:
    """{(gguf type, min_pixels): (model.gguf, mmproj.gguf)} of the full-size model as held in memory."""
    folder = work / "full"
    save_release_layout(base, processor, folder, "v1", sentencepiece_model=True)
    out = {}
    for min_pixels in a.min_pixels:
        # The mmproj carries the pixel bounds (llama.cpp has no flag for them): one export per budget.
        config = (folder / "preprocessor_config.json")
        text = re.sub(r'"min_pixels": \d+', f'"min_pixels": {min_pixels}', config.read_text())
        config.write_text(text)
        for gguf_type in a.gguf_types:
            t = time.perf_counter()
            out[gguf_type, min_pixels] = export_gguf(folder, work / f"gguf-{min_pixels}", gguf_type)
            print(f"converted to {gguf_type} GGUF (min_pixels {min_pixels:,}) in "
                  f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    shutil.rmtree(folder)  # 1.8 GB of bf16 weights, not needed once converted
    return out


def time_full(binary: Path, images: list[Image.Image], a: argparse.Namespace, work: Path) -> None:
    mo_plans, mo_params = manga_ocr_plans(False, a.max_new_tokens)
    t = time.perf_counter()
    base, processor = full_size_random("cpu", torch.float32)
    build_s = time.perf_counter() - t
    ggufs = full_size_ggufs(base, processor, a, work)
    compat = argparse.Namespace(max_new_tokens=a.max_new_tokens, max_pixels=None, batch_size=0,
                                min_pixels=a.min_pixels)
    variants = (FP32, Variant("int8", partial(_quantized, method="int8")))
    ours, _ = ours_plans(base, processor, images, compat, variants)
    llama_rows = {}
    for (gguf_type, min_pixels), (gguf, mmproj) in ggufs.items():
        label = f"llama.cpp {gguf_type}, " + budget_label(min_pixels)
        runner = LlamaCli(binary, gguf, mmproj, threads=a.threads, max_new_tokens=a.max_new_tokens,
                          workdir=work)
        llama_rows[label] = runner
        configure_image_size(processor, min_pixels, RELEASE_BUDGET[1])
        plan_tokens = sum(num_image_tokens(processor, *im.size) for im in images) / len(images)
        # The rows of ours set their own budget before each call; llama.cpp's is in its mmproj.
        ours.append(Plan(label, runner, plan_tokens, runner))
    load_before, t = os.getloadavg(), time.perf_counter()
    rows = time_interleaved(mo_plans + ours, images)
    load_after, timed_s = os.getloadavg(), time.perf_counter() - t
    for r in rows:
        if r.label in llama_rows:  # the image tokens llama.cpp made, from its log
            r.image_tokens = sum(x.image_tokens for x in llama_rows[r.label].timings[1:]) / len(images)
    report(rows, llama_rows, images, a, base, mo_params, build_s, load_before, load_after, timed_s)


def budget_label(min_pixels: int) -> str:
    """The same wording as bench_compat_cpu.ours_plans' rows."""
    budget = f"min_pixels {min_pixels:,}"
    return f"release budget ({budget})" if min_pixels == RELEASE_BUDGET[0] else budget


def report(rows: list[Row], llama_rows: dict[str, LlamaCli], images: list[Image.Image], a: argparse.Namespace,
           base: Any, mo_params: int, build_s: float, load_before: tuple, load_after: tuple,
           timed_s: float) -> None:
    n = len(images)
    sizes = sorted(im.width * im.height for im in images)
    params = sum(p.numel() for p in base.parameters())
    before, after = ("/".join(f"{x:.2f}" for x in load) for load in (load_before, load_after))
    print(f"\ndevice: cpu ({os.cpu_count()} logical CPUs, {physical_cores()} physical cores usable), "
          f"threads: {a.threads}; load average (1/5/15 min) {before} before, {after} after "
          f"({timed_s:.0f} s of timing)")
    print(f"crops: {n} from synthetic full-size pages (median {sizes[n // 2]:,} px), {a.max_new_tokens} "
          f"tokens per crop (ours min_new_tokens, llama.cpp --ignore-eos)")
    print(f"ours: full-size PaddleOCR-VL, {params / 1e6:.1f} M parameters, random weights (built in "
          f"{build_s:.0f} s); manga-ocr arch: {mo_params / 1e6:.1f} M parameters, random weights")
    int8 = next((r.median for r in rows if r.label.startswith("ours int8")), float("nan"))
    greedy = rows[0].median
    print("\nbatch 1, one call per crop, rows in turn on each crop. Seconds per crop: mean (= vision + "
          "prefill + decode + other) and median; ratios: median / ours int8's, median / manga-ocr greedy's")
    head = ("img tok", "tokens", "s/crop", "vision", "prefill", "decode", "other", "median", "/int8",
            "/greedy")
    print(f"{'row':50s} {' '.join(f'{h:>7s}' for h in head)} {'process s':>9s} load avg")
    for r in rows:
        parts = " ".join(f"{r.mean(p):7.3f}" for p in ("vision", "prefill", "decode", "other"))
        mean = sum(s.total for s in r.splits) / len(r.splits)
        process = f"{r.per_crop:9.2f}" if r.label in llama_rows else f"{'':9s}"
        print(f"{r.label:50s} {r.image_tokens:7.0f} {r.mean('steps'):7.1f} {mean:7.3f} {parts} "
              f"{r.median:7.3f} {r.median / int8:6.2f}x {r.median / greedy:6.2f}x {process} {r.load}")
    for label, runner in llama_rows.items():
        timed = runner.timings[1:]  # after the warm-up call
        print(f"{label}: {sum(t.ready for t in timed) / len(timed):.2f} s per call from its start to both "
              f"GGUFs loaded and warmed up (in 'process s', not in s/crop); prompt tokens "
              f"{min(t.prompt_tokens for t in timed)}-{max(t.prompt_tokens for t in timed)}")
    print("\nprocess s: the whole llama-mtmd-cli call (start, loading both GGUFs, warm-up, the work), what a "
          "tool pays that starts the CLI per crop; s/crop leaves it out (llama-server loads the model once)")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_samples", type=int, default=6, help="crops timed, each read by every row")
    ap.add_argument("--check_samples", type=int, default=4,
                    help="crops of the tiny model's greedy-text check (its one synthetic page has few)")
    ap.add_argument("--max_new_tokens", type=int, default=16, help="tokens generated per crop (forced)")
    ap.add_argument("--min_pixels", type=int, nargs="+", default=[RELEASE_BUDGET[0]],
                    help="image min_pixels, one row of each kind per value (default: the release's)")
    ap.add_argument("--gguf_types", nargs="+", default=["q8_0"], choices=GGUF_TYPES,
                    help="llama.cpp rows: the GGUF types to convert the full-size model to")
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="torch and llama.cpp threads (default: the physical cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check_only", action="store_true", help="only the tiny model's check, no timing")
    ap.add_argument("--skip_check", action="store_true", help="only the timing")
    ap.add_argument("--no_build", action="store_true",
                    help=f"fail with a message instead of compiling llama.cpp when {CLI} is not built")
    ap.add_argument("--llama_cpp_src", type=Path,
                    help="build from this llama.cpp source tree instead of downloading the pinned sdist's")
    a = ap.parse_args(argv)
    if min(a.num_samples, a.check_samples, a.max_new_tokens, a.threads, *a.min_pixels) <= 0:
        raise BenchError("--num_samples, --check_samples, --max_new_tokens, --threads and --min_pixels "
                         "must be positive")
    if a.check_only and a.skip_check:
        raise BenchError("--check_only and --skip_check exclude each other")
    return a


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        binary = mtmd_cli(build=not a.no_build, source=a.llama_cpp_src)
        torch.set_num_threads(a.threads)
        torch.manual_seed(a.seed)
        print(f"{CLI}: {binary}", file=sys.stderr)
        # One set of crops from synthetic full-size pages: the check reads the first --check_samples.
        images = crops(a.check_samples if a.check_only else max(a.num_samples, a.check_samples), a.seed,
                       tiny=False)
        with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
            ok = True
            if not a.skip_check:
                Path(tmp, "check").mkdir()
                ok = check_tiny(binary, images[:a.check_samples], a, Path(tmp, "check"))
            if not a.check_only:
                Path(tmp, "time").mkdir()
                time_full(binary, images[:a.num_samples], a, Path(tmp, "time"))
    except (BenchError, GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
