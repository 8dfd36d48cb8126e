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
--threads defaults to the physical cores this process may run on (model.cpu_threads.physical_cores);
--thread_rows K repeats one row (--thread_variant) with K threads, in turn with the others.
Issue 30's rows: --output_vocabulary charset ('+ head': lm_head restricted to the synthetic pages' characters,
as model.output_vocabulary does for a fine-tuned model), --vision_runtime openvino|onnxruntime (the tower on
that runtime, model.vision_runtime), --vision_only (the tower alone, every runtime, fp32 and int8, with its
feature change). The run also prints the matmul rate (GFLOP/s, fp32 and int8) and each budget's FLOPs per
line, the limit the split is set against.
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
from paddleocr_vl_manga.model.cpu_threads import physical_cores  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from paddleocr_vl_manga.model.output_vocabulary import restrict_lm_head  # noqa: E402
from paddleocr_vl_manga.model.quantize import METHODS, quantize_model  # noqa: E402
from paddleocr_vl_manga.model.vision_runtime import (  # noqa: E402
    CompiledVision,
    VisionCore,
    attach_vision_runtime,
    grid_inputs,
)
from tools.make_synthetic_manga109 import CHARSET, generate  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """A row of ours: `transform(model)` returns the model to time (None: the fp32 model as built)."""

    name: str
    transform: Callable[[Any], Any] | None = None


FP32 = Variant("fp32")


def _quantized(model: Any, method: str, head: list[int] | None = None, runtime: str | None = None,
               copy_model: bool = True) -> Any:
    """A copy of the model (or the model itself, changed in place: the last row saves a 3.6 GB copy):
    lm_head restricted to `head` (model.output_vocabulary), the vision tower on `runtime`
    (model.vision_runtime, int8 with method int8; the largest change of its features from the fp32 tower's
    on a 16 x 16-patch random image is printed), linears quantized with `method`."""
    model = copy.deepcopy(model) if copy_model else model
    if head is not None:
        restrict_lm_head(model, head)
    if runtime is not None:
        grid = torch.tensor([[1, 16, 16]])
        pixels = torch.randn(256, 3, 14, 14, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
        t = time.perf_counter()
        attach_vision_runtime(model, runtime, int8=method == "int8")
        build = time.perf_counter() - t
        got = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
        print(f"vision tower on {runtime} ({'int8' if method == 'int8' else 'fp32'}): built in "
              f"{build:.0f} s, max |features - PyTorch fp32's| / max |PyTorch fp32's| = "
              f"{((got - ref).abs().max() / ref.abs().max()).item():.2e} (256 patches, random pixels)")
        method = "int8-text"  # the PyTorch tower is gone
    return quantize_model(model, method)


def head_ids(processor: Any, spec: str) -> list[int]:
    """Token ids of an output vocabulary: "charset" (the synthetic pages' characters, as a demo model's
    output_vocabulary.json lists them, plus eos) or a path to an output_vocabulary.json."""
    if spec != "charset":
        import json

        return sorted(set(json.loads(Path(spec).read_text())))
    tok = processor.tokenizer
    ids = {i for ch in CHARSET for i in tok(ch, add_special_tokens=False).input_ids}
    return sorted(ids | {tok.eos_token_id})


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
    threads: int | None = None  # torch threads for this row (None: the run's --threads)


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
    threads = torch.get_num_threads()
    for p in plans:
        torch.set_num_threads(p.threads or threads)
        p.setup()
        p.call(images[0])
    rows = [Row(p.label, p.image_tokens) for p in plans]
    for i, im in enumerate(images):
        for p, row in zip(plans, rows, strict=True):
            torch.set_num_threads(p.threads or threads)
            p.setup()
            row.loads.append(os.getloadavg()[0])
            p.clock.reset()
            t = time.perf_counter()
            out = p.call(im)
            wall = time.perf_counter() - t
            row.seconds, row.crops = row.seconds + wall, row.crops + 1
            row.splits.append(p.clock.split(wall))
            row.texts.append(out if isinstance(out, str) else "")
        torch.set_num_threads(threads)
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
        vision = [model.model.visual, model.model.projector]
        if hasattr(model.model, "vision_runtime"):  # model.vision_runtime: the tower runs there instead
            vision.append(model.model.vision_runtime)
        clock = Clock(model, vision)
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
            if name == a.thread_variant and min_pixels == a.min_pixels[0]:
                single += [Plan(f"ours {name}, {budget}, {k} thread{'s' * (k > 1)}", mocr, tokens, clock,
                                setup, k) for k in a.thread_rows]
            if a.batch_size:
                batched.append(Plan(f"ours {name}, {budget}", mocr.batch, tokens, setup=setup))
    return single, batched


def pixel_budget(size: dict, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(min_pixels, max_pixels), the processor's own `size` where None."""
    return min_pixels or size["shortest_edge"], max_pixels or size["longest_edge"]


GEMM_SHAPE = (256, 1152, 4304)  # the vision MLP's first linear at 256 patches (min_pixels 50,176)


def gemm_rates(repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one fp32 matmul and of PyTorch's int8 dynamic linear at GEMM_SHAPE, median of repeats,
    with the 1-minute load average: the rate the FLOPs per line are set against."""
    m, k, n = GEMM_SHAPE
    x, linear = torch.randn(m, k), torch.nn.Linear(k, n, bias=False)
    int8 = quantize_model(torch.nn.Sequential(copy.deepcopy(linear)), "int8")
    rates = {"load": os.getloadavg()[0]}
    with torch.no_grad():
        for name, f in (("fp32", linear), ("int8", int8)):
            f(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                f(x)
                times.append(time.perf_counter() - t)
            rates[name] = 2 * m * k * n / sorted(times)[repeats // 2] / 1e9
    return rates


def line_flops(model: Any, processor: Any, image: Image.Image, a: argparse.Namespace) -> dict[str, dict]:
    """FLOPs of reading `image` at each --min_pixels: 2 x the multiply-adds of every nn.Linear (and the
    patch convolution), counted with forward hooks over one generate() of --max_new_tokens tokens, split
    into vision (tower + projector), prefill, decode (text layers) and lm_head. Attention's own matmuls are
    left out: under 1 % at these lengths (N^2 x width against N x width^2 x 12)."""
    counts: dict[str, float] = {}
    state = {"step": 0}
    vision = {id(m) for root in (model.model.visual, model.model.projector) for m in root.modules()}
    head = model.get_output_embeddings()
    patch_embedding = model.model.visual.vision_model.embeddings.patch_embedding

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            macs = out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            macs = out.numel() * module.in_features
        part = ("vision" if id(module) in vision else "lm_head" if module is head else
                "prefill" if state["step"] == 0 else "decode")
        counts[part] = counts.get(part, 0) + 2 * macs

    def step(*_: Any) -> None:
        state["step"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Linear) or m is patch_embedding]
    handles.append(model.register_forward_hook(step))
    size = dict(processor.image_processor.size)
    result = {}
    mocr = MangaOcr.from_model(model, processor, max_new_tokens=a.max_new_tokens)
    try:
        for min_pixels in a.min_pixels:
            configure_image_size(processor, *pixel_budget(size, min_pixels, a.max_pixels))
            counts.clear()
            state["step"] = 0
            mocr(image)
            result[f"min_pixels {min_pixels or size['shortest_edge']:,}"] = dict(counts)
    finally:
        for h in handles:
            h.remove()
        configure_image_size(processor, size["shortest_edge"], size["longest_edge"])
    return result


def vision_only(base: Any, processor: Any, images: list[Image.Image], a: argparse.Namespace) -> int:
    """The vision tower + projector alone on every crop at each --min_pixels: PyTorch fp32 and int8, and each
    --vision_runtime in fp32 and int8, the rows in turn on each crop; seconds per crop (median) and the
    largest difference of each row's features from PyTorch fp32's, relative to their largest magnitude."""
    inner = base.model
    core = VisionCore(inner.visual, inner.projector).eval()
    size = dict(processor.image_processor.size)
    inputs = []  # (budget, pixel_values, grid) per crop and budget
    for min_pixels in a.min_pixels:
        configure_image_size(processor, *pixel_budget(size, min_pixels, a.max_pixels))
        for im in images:
            x = processor.image_processor([im], return_tensors="pt")
            inputs.append((min_pixels or size["shortest_edge"], x["pixel_values"], x["image_grid_thw"]))

    def torch_call(c: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def call(pv: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return c(pv, *grid_inputs(core, grid[0]))
        return call

    rows: dict[str, Callable] = {"PyTorch fp32": torch_call(core)}
    rows["PyTorch int8 (today's --quantize int8)"] = torch_call(quantize_model(copy.deepcopy(core), "int8"))
    for rt in a.vision_runtime:
        for int8 in (False, True):
            t = time.perf_counter()
            rows[f"{rt} {'int8' if int8 else 'fp32'}"] = CompiledVision(core, rt, int8, a.threads)
            print(f"built {rt} {'int8' if int8 else 'fp32'} in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
    reference = [rows["PyTorch fp32"](pv, g) for _, pv, g in inputs]
    for f in rows.values():  # warm-up
        f(inputs[0][1], inputs[0][2])
    times: dict[tuple[str, int], list[float]] = {}
    errors: dict[str, float] = {}
    loads = []
    for (budget, pv, g), ref in zip(inputs, reference, strict=True):
        loads.append(os.getloadavg()[0])
        for name, f in rows.items():
            t = time.perf_counter()
            out = f(pv, g)
            times.setdefault((name, budget), []).append(time.perf_counter() - t)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            errors[name] = max(errors.get(name, 0.0), err)
    print(f"vision tower + projector alone, {len(images)} crops, {a.threads} threads, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; seconds per crop (median), max |features - PyTorch fp32's| / "
          "max |PyTorch fp32's|")
    budgets = sorted({b for _, b in times})
    print(f"{'row':40s} " + " ".join(f"{'mp ' + format(b, ','):>12s}" for b in budgets) + "  max rel diff")
    for name in rows:
        cells = " ".join(f"{sorted(times[name, b])[len(times[name, b]) // 2]:12.3f}" for b in budgets)
        print(f"{name:40s} {cells}  {errors[name]:.2e}")
    return 0


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
    ap.add_argument("--output_vocabulary", metavar="charset|PATH",
                    help="also time each --quantize row with lm_head restricted to these ids "
                    "(model.output_vocabulary): charset = the synthetic pages' characters + eos")
    ap.add_argument("--vision_runtime", nargs="*", default=[], choices=("openvino", "onnxruntime"),
                    help="also time each --quantize row (restricted head if given) with the vision tower on "
                    "this runtime (model.vision_runtime)")
    ap.add_argument("--thread_rows", type=int, nargs="*", default=[],
                    help="also time --thread_variant at the first --min_pixels with this many torch threads")
    ap.add_argument("--thread_variant", default="int8 + head", help="the row --thread_rows repeats")
    ap.add_argument("--skip_fp32", action="store_true", help="no fp32 row of ours (saves a 3.6 GB model)")
    ap.add_argument("--vision_only", action="store_true",
                    help="time only the vision tower (+ projector) of ours on the crops: PyTorch fp32 and "
                    "int8 and each --vision_runtime fp32 and int8, with each one's largest feature change")
    a = ap.parse_args(argv)
    if a.skip_fp32:
        variants = tuple(v for v in variants if v is not FP32)
    head_box: list[int] = []  # filled with the ids once the processor is loaded
    for m in a.quantize:
        variants += (Variant(m, partial(_quantized, method=m)),)
        head = None
        if a.output_vocabulary:
            variants += (Variant(f"{m} + head", partial(_quantized, method=m, head=head_box)),)
            head = head_box
        for rt in a.vision_runtime:
            name = f"{m}{' + head' if a.output_vocabulary else ''} + {rt}"
            variants += (Variant(name, partial(_quantized, method=m, head=head, runtime=rt)),)
    if a.skip_fp32 and variants:  # nothing times the fp32 model: the last row may change it in place
        last = variants[-1]
        variants = (*variants[:-1], Variant(last.name, partial(last.transform, copy_model=False)))
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
    vocab_size = base.get_output_embeddings().out_features
    if a.vision_only:
        return vision_only(base, processor, images, a)
    if a.output_vocabulary:
        head_box += head_ids(processor, a.output_vocabulary)
    flops = line_flops(base, processor, images[0], a)
    single, batched_plans = ours_plans(base, processor, images, a, variants)
    del base  # the variants are copies: 3.6 GB back on a 2-core laptop's RAM
    gemm = gemm_rates()
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
    if a.output_vocabulary:
        print(f"\nrestricted head ('+ head' rows): {len(head_box):,} of {vocab_size:,} lm_head rows "
              f"({a.output_vocabulary})")
    print(f"\nmatmul rate on this machine, {a.threads} threads (load {gemm['load']:.1f}): fp32 "
          f"{gemm['fp32']:.1f} GFLOP/s, PyTorch int8 (dynamic) {gemm['int8']:.1f} GFLOP/s "
          f"({GEMM_SHAPE[0]} x {GEMM_SHAPE[1]} @ {GEMM_SHAPE[1]} x {GEMM_SHAPE[2]})")
    print("FLOPs per line (2 x multiply-adds of every linear layer, one crop of median size, "
          f"{a.max_new_tokens} tokens) and their time at those rates:")
    for budget, parts in flops.items():
        total = sum(parts.values())
        split = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items())
        print(f"  {budget}: {total / 1e9:.1f} GFLOP ({split}) -> {total / 1e9 / gemm['fp32']:.2f} s fp32, "
              f"{total / 1e9 / gemm['int8']:.2f} s int8")
    print("\nsplit: vision = image encoder forwards; prefill = first decoder forward (prompt + image tokens; "
          "manga-ocr: [CLS] over 197 encoder states); decode = the other forwards, one per further token; "
          "other = the rest of the call (preprocessing, generate() between steps, detokenizing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
