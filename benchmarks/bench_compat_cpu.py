"""What a manga reader without a GPU can expect: infer.manga_ocr.MangaOcr against manga-ocr, CPU, one run.

    python benchmarks/bench_compat_cpu.py                                  # 8 crops, release budget
    python benchmarks/bench_compat_cpu.py --min_pixels 147384 50176 --threads 2
    python benchmarks/bench_compat_cpu.py --model tiny --num_samples 2     # seconds: tiny models (tests)

Rows, all timed in the same process on the same crops (cut from synthetic full-size pages), fp32, the batch-1
rows taking turns crop by crop so that a shared machine's drifting load falls on all of them alike:
  manga-ocr arch  the architecture of manga-ocr's release (kha-white/manga-ocr-base), built in code with
                  random weights: transformers' VisionEncoderDecoderModel, a ViT-base/16 encoder at 224 x 224
                  and a 2-layer BERT decoder with cross-attention (vocab 6,144), called as manga_ocr/ocr.py
                  does (grayscale then RGB, ViTImageProcessor resize to 224 x 224 and normalize, generate),
                  with the release's generation config: 4 beams (no_repeat_ngram_size 3, length_penalty 2),
                  and greedy (the same with num_beams=1)
  ours            the full-size (0.9B) PaddleOCR-VL with random weights (benchmarks/full_size.py) through
                  infer.manga_ocr.MangaOcr: `mocr(crop)`, once per crop as manga-ocr's tools call it, at
                  each --min_pixels (the release's 147,384 by default; 50,176 = 224 x 224 gives small crops
                  64 image tokens), then `mocr.batch(crops)` at --batch_size (0 skips it)
Every crop generates exactly --max_new_tokens tokens (default 16, about one manga text line): both models get
min_new_tokens = max_new_tokens, so random weights, which stop at random, cost what a 16-token line costs;
the `tokens` column counts the decoder forwards that actually ran.

The batch-1 time per crop is split with forward hooks on the very calls that are timed (no second run):
  vision   the image encoder's forwards: ours model.model.visual + model.model.projector, manga-ocr the ViT
  prefill  the first top-level forward: ours the 0.9B language model over prompt + image tokens (vision
           subtracted if it ran inside it; transformers 5.24's generate() runs it just before), manga-ocr the
           decoder's first step ([CLS], cross-attention over the 197 encoder states)
  decode   the other top-level forwards, one per further token (15 for 16 tokens)
  other    the rest of the call: preprocessing, prompt, generate()'s bookkeeping and logits processors
           between steps, detokenizing (manga-ocr's row skips detokenizing and post_process: no tokenizer
           files here; microseconds for 16 ids)
Each row prints its mean seconds per crop (what the split adds up to) and its median; the ratios, ours over
manga-ocr's, use the medians, which one stall of a shared machine hardly moves.
--threads defaults to the physical cores this process may run on (see physical_cores).
A row of ours with a changed model (e.g. quantized) is added by passing main() a Variant: a name and a
function that returns the changed model (leaving the one it is given as it was).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    BertConfig,
    GenerationConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402
from benchmarks.bench_eval import full_size_random  # noqa: E402
from paddleocr_vl_manga.data.collator import configure_image_size, num_image_tokens  # noqa: E402
from paddleocr_vl_manga.data.dataset import load_image, read_jsonl  # noqa: E402
from paddleocr_vl_manga.infer.manga_ocr import MangaOcr  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from paddleocr_vl_manga.model.quantize import METHODS, quantize_model  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET, generate  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A row of ours: `transform(model)` returns the model to time (None: the fp32 model as built)."""

    name: str
    transform: Callable[[Any], Any] | None = None


FP32 = Variant("fp32")


def _quantized(model: Any, method: str) -> Any:
    return quantize_model(copy.deepcopy(model), method)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask: taskset and cpusets count).

    torch's default thread count is not used: it follows OMP_NUM_THREADS (set to 1 in test environments, or to
    anything in a user's shell). SMT siblings share one core's vector units, so GEMM-bound inference gains
    nothing from them and loses to their contention. /proc/cpuinfo pairs each logical CPU with its (physical
    id, core id); where it lacks them (some ARM kernels, non-Linux) every allowed logical CPU counts.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    try:
        blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return len(allowed)
    cores = set()
    for block in blocks:
        pairs = (line.partition(":") for line in block.splitlines())
        info = {k.strip(): v.strip() for k, _, v in pairs}
        if "core id" in info and info.get("processor", "").isdigit() and int(info["processor"]) in allowed:
            cores.add((info.get("physical id"), info["core id"]))
    return len(cores) or len(allowed)


# ---------------------------------------------------------------- manga-ocr's architecture


def manga_ocr_arch(tiny: bool = False) -> tuple[VisionEncoderDecoderModel, ViTImageProcessor]:
    """kha-white/manga-ocr-base's architecture and preprocessing, random weights (nothing is downloaded).

    Its training code (manga_ocr_dev/training/get_model.py) builds a VisionEncoderDecoderModel from
    facebook/deit-base-patch16-224's config read as a ViTConfig (ViT-base/16 at 224, pooler included) and
    cl-tohoku/bert-base-japanese-char-v2's BertConfig cut to its last 2 layers, with cross-attention and
    vocab 6,144, untied; [CLS] (2) starts decoding, [SEP] (3) ends it. The released preprocessor_config.json
    is a ViTFeatureExtractor of size 224, mean = std = 0.5, bilinear. tiny: widths 32 for tests, the same
    224 x 224 input (197 encoder states) and vocab.
    """
    width, heads, ff = (32, 2, 64) if tiny else (768, 12, 3072)
    encoder = ViTConfig(hidden_size=width, num_hidden_layers=2 if tiny else 12, num_attention_heads=heads,
                        intermediate_size=ff, image_size=224, patch_size=16, qkv_bias=True,
                        layer_norm_eps=1e-12)
    decoder = BertConfig(vocab_size=6144, hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                         intermediate_size=ff, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
                         is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.tie_word_embeddings = False
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
    model = VisionEncoderDecoderModel(config=config).eval()
    # The release's beam settings (get_model.py). Its max_length 300 is left out: manga-ocr passes it to
    # generate(), where our max_new_tokens replaces it.
    model.generation_config = GenerationConfig(
        decoder_start_token_id=2, eos_token_id=3, pad_token_id=0, num_beams=4, no_repeat_ngram_size=3,
        length_penalty=2.0, early_stopping=True,
    )
    processor = ViTImageProcessor(size={"height": 224, "width": 224}, resample=Image.Resampling.BILINEAR,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model, processor


@torch.inference_mode()
def manga_ocr_call(model: Any, processor: Any, img: Image.Image, **generate_kwargs: Any) -> torch.Tensor:
    """manga_ocr.MangaOcr.__call__ up to detokenizing: its conversion, its _preprocess, its generate()."""
    img = img.convert("L").convert("RGB")
    x = processor(img, return_tensors="pt").pixel_values.squeeze()
    return model.generate(x[None].to(model.device), **generate_kwargs)[0].cpu()


# ---------------------------------------------------------------- timing


@dataclass
class Split:
    """One call's wall time cut into parts, seconds; steps = top-level forwards (generated tokens)."""

    vision: float
    prefill: float
    decode: float
    other: float
    steps: int

    @property
    def total(self) -> float:
        return self.vision + self.prefill + self.decode + self.other


class Clock:
    """Forward hooks timing the vision modules and every top-level forward of the calls made while reset."""

    def __init__(self, model: torch.nn.Module, vision: list[torch.nn.Module]) -> None:
        self.handles = [model.register_forward_pre_hook(self._step_start),
                        model.register_forward_hook(self._step_end)]
        for m in vision:
            self.handles += [m.register_forward_pre_hook(self._vision_start),
                             m.register_forward_hook(self._vision_end)]
        self.reset()

    def reset(self) -> None:
        self.steps: list[float] = []
        self.vision = self.vision_in_first_step = 0.0
        self._in_step = False

    def _step_start(self, *_: Any) -> None:
        self._in_step, self._t_step = True, time.perf_counter()

    def _step_end(self, *_: Any) -> None:
        self.steps.append(time.perf_counter() - self._t_step)
        self._in_step = False

    def _vision_start(self, *_: Any) -> None:
        self._t_vision = time.perf_counter()

    def _vision_end(self, *_: Any) -> None:
        dt = time.perf_counter() - self._t_vision
        self.vision += dt
        if self._in_step and len(self.steps) == 0:
            self.vision_in_first_step += dt

    def split(self, wall: float) -> Split:
        prefill = self.steps[0] - self.vision_in_first_step if self.steps else 0.0
        decode = sum(self.steps[1:])
        return Split(self.vision, prefill, decode, wall - self.vision - prefill - decode, len(self.steps))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Plan:
    """A row to time: `call(crop)` (or `call(crops)` for a batched row) after `setup()`, split by `clock`."""

    label: str
    call: Callable[[Any], Any]
    image_tokens: float  # per crop (manga-ocr: the encoder states its decoder attends to)
    clock: Clock | None = None
    setup: Callable[[], None] = lambda: None


@dataclass
class Row:
    label: str
    image_tokens: float
    seconds: float = 0.0  # all crops
    crops: int = 0
    loads: list[float] = field(default_factory=list)  # 1-minute load average before each call
    splits: list[Split] = field(default_factory=list)  # per crop; empty for batched rows
    texts: list[str] = field(default_factory=list)

    @property
    def per_crop(self) -> float:
        return self.seconds / self.crops

    @property
    def median(self) -> float:
        """Median seconds of one call (a batched row: its mean): a stall of the shared machine (one crop took
        263 s instead of 0.7 s in a run here, the time outside every forward) moves it little."""
        walls = sorted(s.total for s in self.splits) or [self.per_crop]
        return (walls[(len(walls) - 1) // 2] + walls[len(walls) // 2]) / 2

    @property
    def load(self) -> str:
        return f"{min(self.loads):.1f}-{max(self.loads):.1f}"

    def mean(self, part: str) -> float:
        return sum(getattr(s, part) for s in self.splits) / len(self.splits)


def time_interleaved(plans: list[Plan], images: list[Image.Image]) -> list[Row]:
    """Every plan once per crop, crop by crop (plan A, B, C on crop 1, then on crop 2, ...).

    On a shared machine the load drifts over minutes; taking the rows in turn exposes each to the same load,
    so their ratios stay fair even when the absolute times do not. A warm-up call per plan comes first
    (one-off allocations, as manga-ocr's own warm-up at load).
    """
    for p in plans:
        p.setup()
        p.call(images[0])
    rows = [Row(p.label, p.image_tokens) for p in plans]
    for i, im in enumerate(images):
        for p, row in zip(plans, rows, strict=True):
            p.setup()
            row.loads.append(os.getloadavg()[0])
            p.clock.reset()
            t = time.perf_counter()
            out = p.call(im)
            wall = time.perf_counter() - t
            row.seconds, row.crops = row.seconds + wall, row.crops + 1
            row.splits.append(p.clock.split(wall))
            row.texts.append(out if isinstance(out, str) else "")
        # Progress on stderr: a long run that is stopped still shows how far it got.
        done = ", ".join(f"{r.label} {r.splits[-1].total:.2f} s" for r in rows)
        print(f"crop {i + 1}/{len(images)}: {done}", file=sys.stderr, flush=True)
    return rows


def time_batched(plans: list[Plan], images: list[Image.Image]) -> list[Row]:
    """Each plan's call once on all crops (mocr.batch), no warm-up beyond the batch-1 rows'."""
    rows = []
    for p in plans:
        p.setup()
        row = Row(p.label, p.image_tokens, loads=[os.getloadavg()[0]], crops=len(images))
        t = time.perf_counter()
        row.texts = p.call(images)
        row.seconds = time.perf_counter() - t
        row.loads.append(os.getloadavg()[0])
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the run


def crops(num_samples: int, seed: int, tiny: bool) -> list[Image.Image]:
    """Crops cut by prepare_manga109_data.py from synthetic pages: full-size, or one small page if tiny."""
    with tempfile.TemporaryDirectory() as tmp:
        release, data = Path(tmp, "m109"), Path(tmp, "data")
        size = {"books": 1, "pages": 1, "width": 800, "height": 560} if tiny else {"books": 1, "pages": 4}
        generate(release, seed=seed, progress=False, **size)
        prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data), split_mode="random",
                                       num_workers=1))
        records = [r for s in prep.SPLITS for r in read_jsonl(data / f"{s}.jsonl")]
        records = random.Random(seed).sample(records, min(num_samples, len(records)))
        return [load_image(r, "bench") for r in records]


def manga_ocr_plans(tiny: bool, max_new_tokens: int) -> tuple[list[Plan], int]:
    """manga-ocr's architecture, greedy and 4 beams, one call per crop; also its parameter count."""
    model, processor = manga_ocr_arch(tiny)
    force = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    clock = Clock(model, [model.encoder])
    states = (224 // 16) ** 2 + 1  # encoder states the decoder attends to: 196 patches and [CLS]
    plans = [
        Plan(label, partial(manga_ocr_call, model, processor, num_beams=beams, **force), states, clock)
        for label, beams in (("manga-ocr arch, greedy", 1), ("manga-ocr arch, 4 beams", 4))
    ]
    return plans, sum(p.numel() for p in model.parameters())


def ours_plans(base: Any, processor: Any, images: list[Image.Image], a: argparse.Namespace,
               variants: tuple[Variant, ...]) -> tuple[list[Plan], list[Plan]]:
    """Every variant of ours at every --min_pixels: mocr(crop) per crop, and mocr.batch(crops) if asked."""
    base.generation_config.min_new_tokens = a.max_new_tokens  # generate_texts passes max_new_tokens only
    # Every transform first: one that copies the model after a Clock's hooks were put on it would copy them.
    models = [(v.name, v.transform(base) if v.transform else base) for v in variants]
    size = processor.image_processor.size
    release = (size["shortest_edge"], size["longest_edge"])
    max_pixels = a.max_pixels or release[1]
    single: list[Plan] = []
    batched: list[Plan] = []
    for name, model in models:
        clock = Clock(model, [model.model.visual, model.model.projector])
        mocr = MangaOcr.from_model(model, processor, max_new_tokens=a.max_new_tokens,
                                   batch_size=a.batch_size or 1)
        for min_pixels in a.min_pixels:
            min_pixels = min_pixels or release[0]
            budget = f"min_pixels {min_pixels:,}"
            if max_pixels != release[1]:
                budget += f", max_pixels {max_pixels:,}"
            if (min_pixels, max_pixels) == release:
                budget = f"release budget ({budget})"
            configure_image_size(processor, min_pixels, max_pixels)
            tokens = sum(num_image_tokens(processor, *im.size) for im in images) / len(images)
            # The processor is shared by the rows, which take turns: each sets its budget before its call.
            setup = partial(configure_image_size, processor, min_pixels, max_pixels)
            single.append(Plan(f"ours {name}, {budget}", mocr, tokens, clock, setup))
            if a.batch_size:
                batched.append(Plan(f"ours {name}, {budget}", mocr.batch, tokens, setup=setup))
    return single, batched


def main(argv: list[str] | None = None, variants: tuple[Variant, ...] = (FP32,)) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("full", "tiny"), default="full",
                    help="full: the real architectures (random weights); tiny: both shrunk, for tests")
    ap.add_argument("--num_samples", type=int, default=8, help="crops, each read by every row")
    ap.add_argument("--max_new_tokens", type=int, default=16, help="tokens generated per crop (forced)")
    ap.add_argument("--min_pixels", type=int, nargs="+", default=[None],
                    help="our image processor's min_pixels, one row of ours each (default: the release's)")
    ap.add_argument("--max_pixels", type=int, help="our processor's max_pixels (default: the release's)")
    ap.add_argument("--batch_size", type=int, default=8, help="batch of the mocr.batch(crops) rows (0: none)")
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="torch CPU threads (default: the physical cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", nargs="*", default=[], choices=METHODS,
                    help="also time ours quantized this way (model.quantize.quantize_model), a row each")
    a = ap.parse_args(argv)
    variants = (*variants, *(Variant(m, partial(_quantized, method=m)) for m in a.quantize))
    if min(a.num_samples, a.max_new_tokens, a.threads) <= 0 or a.batch_size < 0:
        print("error: --num_samples, --max_new_tokens and --threads must be positive, --batch_size >= 0",
              file=sys.stderr)
        return 2
    tiny = a.model == "tiny"
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    images = crops(a.num_samples, a.seed, tiny)
    n = len(images)

    mo_plans, mo_params = manga_ocr_plans(tiny, a.max_new_tokens)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if tiny:
            tiny_dir = build_tiny_model(Path(tmp, "tiny"), charset=CHARSET)
            base, processor = load_model_and_processor(tiny_dir, dtype=torch.float32)
        else:
            base, processor = full_size_random("cpu", torch.float32)
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in base.parameters())
    single, batched_plans = ours_plans(base, processor, images, a, variants)
    load_before = os.getloadavg()[0]
    rows = time_interleaved(mo_plans + single, images)
    batched = time_batched(batched_plans, images)
    load_after = os.getloadavg()[0]

    sizes = sorted(im.width * im.height for im in images)
    print(f"device: cpu ({os.cpu_count()} logical CPUs, {physical_cores()} physical cores usable), "
          f"threads: {a.threads}, fp32; load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"crops: {n} from synthetic {'small' if tiny else 'full-size'} pages "
          f"(median {sizes[n // 2]:,} px), {a.max_new_tokens} tokens generated per crop "
          "(min_new_tokens = max_new_tokens)")
    print(f"manga-ocr arch: {'tiny ' if tiny else ''}ViT/16 at 224 x 224 + 2-layer BERT decoder, "
          f"{mo_params / 1e6:.1f} M parameters, random weights")
    print(f"ours: {'tiny' if tiny else 'full-size'} PaddleOCR-VL, {params / 1e6:.1f} M parameters, random "
          f"weights (built in {build_s:.0f} s)")
    greedy, beams = rows[0].median, rows[1].median
    print("\nbatch 1, one call per crop, the rows in turn on each crop. Seconds per crop: mean (split into "
          "vision + prefill + decode + other) and median; ratios: this row's median / manga-ocr arch's")
    print(f"{'row':52s} {'img tok':>7s} {'tokens':>6s} {'s/crop':>7s} {'vision':>7s} {'prefill':>7s} "
          f"{'decode':>7s} {'other':>7s} {'median':>7s} {'/greedy':>8s} {'/4 beams':>8s}  load avg")
    for r in rows:
        parts = " ".join(f"{r.mean(part):7.3f}" for part in ("vision", "prefill", "decode", "other"))
        print(f"{r.label:52s} {r.image_tokens:7.0f} {r.mean('steps'):6.1f} {r.per_crop:7.3f} {parts} "
              f"{r.median:7.3f} {r.median / greedy:7.2f}x {r.median / beams:7.2f}x  {r.load}")
    if any(s.steps != a.max_new_tokens for r in rows for s in r.splits):
        print(f"warning: some calls ran a number of decoder forwards other than {a.max_new_tokens}")
    if batched:
        print(f"\nmocr.batch(crops), batch {a.batch_size} (seconds per crop)")
        print(f"{'row':52s} {'img tok':>7s} {'s/crop':>7s} {'crops/s':>7s} {'/greedy':>8s} {'/4 beams':>8s}  "
              "load avg  identical texts to batch 1  (ratios: to the medians above)")
        singles = {r.label: r for r in rows}
        for r in batched:
            same = sum(x == y for x, y in zip(singles[r.label].texts, r.texts, strict=True))
            print(f"{r.label:52s} {r.image_tokens:7.0f} {r.per_crop:7.3f} {1 / r.per_crop:7.2f} "
                  f"{r.per_crop / greedy:7.2f}x {r.per_crop / beams:7.2f}x  "
                  f"{r.load}  {same}/{n}")
    print("\nsplit: vision = image encoder forwards; prefill = first decoder forward (prompt + image tokens; "
          "manga-ocr: [CLS] over 197 encoder states); decode = the other forwards, one per further token; "
          "other = the rest of the call (preprocessing, generate() between steps, detokenizing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
