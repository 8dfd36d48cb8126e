"""Time training recipes side by side: the seed project's against sft_paddleocr_vl.py's.

    python benchmarks/bench_train.py --config tiny --recipe seed default --steps 2 --warmup 1   # CPU smoke
    python benchmarks/bench_train.py --config full --recipe seed default default_nogc lowres \
        --steps 20 --warmup 3 --memory_cap_gb 12 --check_loss --json bench_train.json      # GPU

Every recipe trains on 16 crops per optimizer step (micro-batch B x accumulation A):
  seed          bf16 weights stepped by torch.optim.AdamW, 1 x 16, bf16 autocast, model(**batch).loss / 16
                (full-vocabulary logits at every position, mean per crop), gradient checkpointing, random
                order, loaded in the training process (Trainer's defaults: no workers, pinned memory).
  default       ours (--precision bf16_lean): bf16 weights + optimi.AdamW(kahan_sum=True); answer_loss (logits
                only where the next token is an answer, summed CE / answer tokens of the step); 8 x 2 in
                shuffled batches (group=1: length-grouped, as --group_by_length); checkpointing;
                --num_workers workers, pinned memory.
  default_nogc  default without gradient checkpointing: no recomputation, more activation memory.
  fp32_master   default with fp32 weights + bf16 autocast + torch AdamW (--precision fp32_master, >12 GB).
  lora          default's bf16 base frozen, rank-16 LoRA adapters (alpha 32, dropout 0.05; fp32, stepped by
                torch AdamW, fused on CUDA) on the decoder's attention and MLP projections (--lora_r 16).
  lora_vision   lora with adapters on the vision encoder too (--lora_targets language,vision).
  lowres        default with min_pixels lowered to 28*28*64 (release: 147384). CHANGES WHAT THE MODEL SEES
                (fewer image tokens per crop): a different training, not a faster way to do the same one.
Overrides: default:bs=4,ga=4,gc=0,group=1,workers=2,rope=0. Our recipes take the multimodal rope position
ids from OCRCollator (computed in the loader workers); rope=0 leaves them to the model's forward, which
computes them on the GPU with host syncs per sample, as the seed does: a recipe and its rope=0 twin are
printed side by side with their ratio. Every recipe uses SDPA (the issue does not name the seed's).
--deadline (Unix time, set by benchmarks/gpu_suite.py) starts no recipe after it and ends a recipe's timing
with the first step that finishes after it; --json is rewritten after every recipe, so a run killed later
keeps the rows already measured.

full = PaddleOCRVLConfig() defaults (0.9B: text 1024 x 18, vocab 103424; vision 1152 x 27; untied lm_head),
random weights, driven by the release-like processor (tools/make_tiny_model.release_processor: the
release's token ids, tokenizer, chat template and image-size bounds). tiny = tools/make_tiny_model.py as
built (CPU smoke test). Data: synthetic 1654x1170 pages -> data.manga109.run -> OCRDataset +
OCRCollator (max_length 1536).

MFU = model FLOPs / time / the device's dense bf16 peak. Model FLOPs are what the objective needs, the same
for every recipe (PaLM convention: neither recomputation by checkpointing nor logits that the loss never
reads count). With P = parameters, n_i = patches of image i, T_r = real tokens of row r:
  6 * (P_vision * sum n_i + P_projector * sum n_i / 4 + P_decoder * sum T_r + P_lm_head * answer tokens)
  + 12 * (L_v * d_v * sum n_i^2 + L_t * heads * head_dim * sum T_r^2)       (attention; causal not halved)
LoRA recipes need no weight gradients: a frozen part costs 4x its parameters per token (forward and the
gradient of its input) where it or an earlier part holds adapters, else 2x (forward only: nothing before it
is trained), and its attention 12 or 4; the adapters' own FLOPs (< 1 %) are not counted.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader, RandomSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402
import paddleocr_vl_manga.train.trainer as sft_trainer  # noqa: E402
from benchmarks.full_size import build_full_size_random  # noqa: E402
from benchmarks.gpu_tables import rope_pairs  # noqa: E402
from paddleocr_vl_manga.data.collator import OCRCollator  # noqa: E402
from paddleocr_vl_manga.data.dataset import OCRDataset  # noqa: E402
from paddleocr_vl_manga.data.lengths import filter_split  # noqa: E402
from paddleocr_vl_manga.evaluate.evaluation import device_description  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from paddleocr_vl_manga.model.lora import add_lora  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET, generate  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402

MAX_LENGTH = 1536
# Dense bf16 tensor peaks; the first substring of the device name that matches wins. GeForce Ampere runs
# bf16 (always fp32-accumulated) at half its fp16-accumulate rate: ~51 TFLOPS is the RTX 3060's fp16 figure.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12), ("3060", 25.4e12)]


@dataclass
class Recipe:
    name: str
    precision: str = "bf16_lean"  # seed_bf16 (torch AdamW on bf16 weights) | bf16_lean | fp32_master
    loss: str = "answer"  # model: model(**batch).loss / A | answer: sft_trainer.answer_loss
    bs: int = 8
    ga: int = 2
    gc: bool = True
    group: bool = False  # length-grouped batches, as --group_by_length (off by default in training too)
    workers: int | None = None  # None: --num_workers
    min_pixels: int | None = None
    lora_r: int = 0
    lora_targets: str = "language"
    rope: bool = True  # rope position ids from the collator (False: the model's forward computes them)


PRESETS: dict[str, dict[str, Any]] = {
    "seed": {"precision": "seed_bf16", "loss": "model", "bs": 1, "ga": 16, "workers": 0, "rope": False},
    "default": {},
    "default_nogc": {"gc": False},
    "fp32_master": {"precision": "fp32_master"},
    "lowres": {"min_pixels": 28 * 28 * 64},
    "lora": {"lora_r": 16},
    "lora_vision": {"lora_r": 16, "lora_targets": "language,vision"},
}


def parse_recipe(spec: str) -> Recipe:
    """'default' or 'default:bs=4,ga=4,gc=0,group=1,workers=2,rope=0' -> Recipe."""
    name, _, opts = spec.partition(":")
    if name not in PRESETS:
        raise SystemExit(f"error: unknown recipe {name!r}; choose from {', '.join(PRESETS)}")
    recipe = Recipe(spec, **PRESETS[name])
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key not in ("bs", "ga", "gc", "group", "workers", "rope") or not value.isdigit():
            raise SystemExit(f"error: bad recipe option {opt!r} in {spec!r} (bs=, ga=, gc=0/1, group=0/1, "
                             "workers=, rope=0/1)")
        setattr(recipe, key, bool(int(value)) if key in ("gc", "group", "rope") else int(value))
    return recipe


def build(config: str, tiny_dir: str, recipe: Recipe, device: torch.device) -> tuple[Any, Any]:
    dtype = torch.float32 if recipe.precision == "fp32_master" else torch.bfloat16
    torch.manual_seed(0)  # every recipe starts from the same weights
    if config == "full":
        model, processor = build_full_size_random(dtype=dtype, device=device, attn_implementation="sdpa")
    else:
        model, processor = load_model_and_processor(
            tiny_dir, dtype=dtype, device=device, attn_implementation="sdpa"
        )
    if recipe.min_pixels:  # only ever lowers the bound (the tiny processor's is lower still)
        size = processor.image_processor.size
        size["shortest_edge"] = min(recipe.min_pixels, size["shortest_edge"])
    model.config.use_cache = False
    if recipe.gc:  # activation_checkpointing_enable is the newer name; the old one warns
        on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        on({"use_reentrant": False})
    if recipe.lora_r:  # as sft_paddleocr_vl.py --lora_r with its default alpha (2 r) and dropout
        model = add_lora(model, recipe.lora_r, recipe.lora_targets)
    return model.train(), processor


def batches(data_dir: Path, processor: Any, recipe: Recipe, workers: int, pin: bool) -> Iterator[dict]:
    """Endless CPU micro-batches (pinned on CUDA), drawn the way the recipe's trainer would draw them."""
    ds = OCRDataset(data_dir / "train.jsonl")
    lengths = filter_split("train", ds, processor, MAX_LENGTH).lengths
    if len(ds) < recipe.bs:
        raise SystemExit(f"error: {len(ds)} crops < batch size {recipe.bs}; raise --books/--pages")
    if recipe.group and recipe.bs > 1:  # as BF16Trainer with --group_by_length
        sampler = sft_trainer.EpochLengthGroupedSampler(recipe.bs, lengths, seed=0)
    else:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    collator = OCRCollator(processor, max_length=MAX_LENGTH, rope_in_collator=recipe.rope)
    loader = DataLoader(ds, batch_size=recipe.bs, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=collator, pin_memory=pin, persistent_workers=workers > 0)
    for epoch in itertools.count():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict, *, own_rope: bool = False) -> dict:
    """A collated batch as a plain model(**batch) takes it: without answer_loss's logit positions, and with
    own_rope without the collator's rope position ids too (the model then computes its own)."""
    drop = {"logits_to_keep", "position_ids"} if own_rope else {"logits_to_keep"}
    return {k: v for k, v in batch.items() if k not in drop}


def recipe_loss(model: Any, batch: dict, recipe: Recipe, n_items: int, ga: int) -> torch.Tensor:
    """The loss a recipe backpropagates for one micro-batch (call it under bf16 autocast)."""
    if recipe.loss == "model":
        return model(**model_inputs(batch), use_cache=False).loss / ga
    return sft_trainer.answer_loss(model, batch, n_items)[0]


def check_loss(model: Any, batch: dict, recipe: Recipe, rtol: float = 1e-2) -> dict[str, Any]:
    """The recipe's loss on one micro-batch vs plain fp32 model(**batch).loss with the same weights.

    Catches wrong normalization and precision loss, and rope position ids from the collator that differ
    from the model's own (the reference computes its own). With random weights the logits are near-uniform,
    so a target shifted by one costs the same and passes; the unit test checks that with a peaked lm_head.
    """
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    was_training = model.training
    model.eval()  # no dropout noise in the comparison
    saved = [(p, p.data) for p in model.parameters()]
    try:
        with torch.no_grad():
            with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
                ours = float(recipe_loss(model, batch, recipe, n_items, ga=1))
            # Upcast the parameters only: model.float() then .to(bf16) would also round the fp32 RoPE buffers.
            for p, data in saved:
                p.data = data.float()
            plain = float(model(**model_inputs(batch, own_rope=True), use_cache=False).loss)
    finally:
        for p, data in saved:
            p.data = data
        model.train(was_training)
    return {"recipe_loss": ours, "fp32_loss": plain, "ok": abs(ours - plain) <= rtol * abs(plain) + 1e-3}


def flop_counter(model: Any, recipe: Recipe | None = None) -> Callable[[dict], float]:
    """Model FLOPs of one micro-batch (formula in the module docstring)."""
    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    # per-parameter factors of vision, projector, decoder, lm_head: 6 trained, 4 or 2 frozen (docstring)
    f_vis, f_proj, f_dec, f_head = 6, 6, 6, 6
    if recipe is not None and recipe.lora_r:
        model = model.get_base_model()
        parts = ("vision", "projector", "language")
        first = next(i for i, g in enumerate(parts) if g in recipe.lora_targets)  # first part with adapters
        f_vis, f_proj, f_dec, f_head = (4 if i >= first else 2 for i in range(4))
    inner, vc, tc = model.model, model.config.vision_config, model.config.text_config
    p_vis, p_proj, p_head = n(inner.visual), n(inner.projector), model.lm_head.weight.numel()
    p_dec = n(inner.language_model) - inner.language_model.embed_tokens.weight.numel()  # a lookup, no matmul
    att_v = (12 if f_vis != 2 else 4) * vc.num_hidden_layers * vc.hidden_size
    att_t = 12 * tc.num_hidden_layers * tc.num_attention_heads * tc.head_dim

    def flops(batch: dict) -> float:
        patches = batch["image_grid_thw"].prod(-1).double()
        rows = batch["attention_mask"].sum(1).double()
        answers = float((batch["labels"][:, 1:] != -100).sum())
        linear = (f_vis * p_vis * patches.sum() + f_proj * p_proj * patches.sum() / 4
                  + f_dec * p_dec * rows.sum() + f_head * p_head * answers)
        return float(linear + att_v * (patches**2).sum() + att_t * (rows**2).sum())

    return flops


def run_recipe(recipe: Recipe, a: argparse.Namespace, tiny_dir: str, data_dir: Path,
               device: torch.device) -> dict[str, Any]:
    model, processor = build(a.config, tiny_dir, recipe, device)
    workers = a.num_workers if recipe.workers is None else recipe.workers
    stream = batches(data_dir, processor, recipe, workers, pin=device.type == "cuda")
    row: dict[str, Any] = {}
    if a.check_loss:
        row["check"] = check_loss(model, to_device(next(stream), device), recipe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the check's fp32 weights are not the recipe's memory
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.precision == "bf16_lean" and not recipe.lora_r:
        cls, kwargs = sft_trainer.lean_optimizer(a.lr)
        opt = cls(params, weight_decay=0.0, **kwargs)
    else:  # fp32_master, LoRA: Trainer's default on torch >= 2.8 is fused; the seed's older Trainer: foreach
        fused = (recipe.precision == "fp32_master" or recipe.lora_r > 0) and device.type == "cuda"
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=fused)
    flops, image_token = flop_counter(model, recipe), processor.image_token_id
    totals = dict.fromkeys(("samples", "tokens", "image_tokens", "flops"), 0.0)
    timed_steps = 0
    for step in range(a.warmup + a.steps):
        if timed_steps and a.deadline is not None and time.time() >= a.deadline:
            break  # out of time: the steps timed so far (>= 1) still give the rates
        if step == a.warmup:  # warm-up pays kernel selection, allocator growth and worker start-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        micro = [next(stream) for _ in range(recipe.ga)]
        # Answer tokens of the whole step (Trainer's num_items_in_batch): the micro-batch losses sum to one
        # token mean. Counted on the CPU copies, as are the totals: reading GPU values would sync each time.
        n_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        for mb in micro:
            if step >= a.warmup:
                totals["samples"] += len(mb["input_ids"])
                totals["tokens"] += float(mb["attention_mask"].sum())
                totals["image_tokens"] += float((mb["input_ids"] == image_token).sum())
                totals["flops"] += flops(mb)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = recipe_loss(model, to_device(mb, device), recipe, n_items, recipe.ga)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timed_steps += step >= a.warmup
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stream.close()  # stops the loader's workers
    return {**row, "seconds": seconds, "timed_steps": timed_steps,
            "samples_per_s": totals["samples"] / seconds, "tokens_per_s": totals["tokens"] / seconds,
            "image_tokens_per_sample": totals["image_tokens"] / totals["samples"],
            "model_flops_per_s": totals["flops"] / seconds}


def print_table(rows: list[dict[str, Any]]) -> None:
    seed = next((r for r in rows if r["recipe"] == "seed" and r["status"] == "ok"), None)
    line = "{:26} {:>5} {:>3} {:>10} {:>10} {:>8} {:>9} {:>6} {:>8}  {}"
    print("\n" + line.format("recipe", "BxA", "gc", "samples/s", "tokens/s", "img tok", "peak GiB", "MFU",
                             "vs seed", "status"))
    for r in rows:
        cells = ["-"] * 6
        if r["status"] == "ok":
            cells = [f"{r['samples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['image_tokens_per_sample']:.1f}",
                     "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}",
                     "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     f"{r['samples_per_s'] / seed['samples_per_s']:.2f}x" if seed else "n/a"]
        cut = r.get("timed_steps", r["steps"]) < r["steps"]
        status = r["status"] + (f" ({r['timed_steps']}/{r['steps']} steps: time budget)" if cut else "")
        print(line.format(r["recipe"], r["bxa"], int(r["gc"]), *cells, status))
    for r in (r for r in rows if "check" in r):
        c = r["check"]
        print(f"check_loss {r['recipe']}: recipe {c['recipe_loss']:.4f} vs fp32 model(**batch).loss "
              f"{c['fp32_loss']:.4f} -> {'OK' if c['ok'] else 'MISMATCH'}")
    for on, off in rope_pairs(rows):  # the collator's rope ids against the model's own, side by side
        x, y = on["samples_per_s"], off["samples_per_s"]
        print(f"rope ids: {on['recipe']} (collator) {x:.2f} samples/s vs {off['recipe']} (model) "
              f"{y:.2f} samples/s: {x / y:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--recipe", nargs="+", default=["seed", "default"], help=f"of {', '.join(PRESETS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per recipe")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--books", type=int, default=2, help="synthetic books (full-size 1654x1170 pages)")
    ap.add_argument("--pages", type=int, default=8, help="pages per synthetic book")
    ap.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of our recipes")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--memory_cap_gb", type=float, help="cap the CUDA allocator at this many GiB")
    ap.add_argument("--check_loss", action="store_true", help="compare each recipe's loss to the fp32 one")
    ap.add_argument("--json", help="write the rows to this file (rewritten after every recipe)")
    ap.add_argument("--deadline", type=float, help="Unix time: start no recipe after it, cut timing at it")
    ap.add_argument("--data_dir", help="prepared crops to train on (train.jsonl) instead of --books/--pages "
                    "(benchmarks/gpu_fixtures.py builds them once per GPU suite)")
    ap.add_argument("--tiny_dir", help="the tiny model already built (--config tiny)")
    a = ap.parse_args(argv)
    recipes = [parse_recipe(s) for s in a.recipe]
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, cap = None, "none" if not a.memory_cap_gb else f"{a.memory_cap_gb} GiB"
    if device.type == "cpu":  # intra-op threads only fight the loader workers over the tiny model's small ops
        torch.set_num_threads(1)
        cap = "n/a on CPU"
    else:
        name = torch.cuda.get_device_name(device)
        peak = next((flops for key, flops in PEAK_BF16 if key in name), None)
        if a.memory_cap_gb:  # stands in for a 12 GB card (the CUDA context, ~0.5 GB there, is not counted)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 2**30 / total), device)
    desc = device_description(str(device))
    print(f"device: {desc}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"config {a.config}; memory cap {cap}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        release, data_dir = Path(tmp, "m109"), Path(a.data_dir or Path(tmp, "data"))
        if not a.data_dir:
            generate(release, books=a.books, pages=a.pages, seed=0, num_workers=a.num_workers, progress=False)
            prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data_dir),
                                           num_workers=1, split_mode="random", test_fraction=0.0,
                                           val_fraction=0.0))
        tiny_dir = a.tiny_dir or ""  # full: never used
        if a.config == "tiny" and not tiny_dir:
            tiny_dir = build_tiny_model(Path(tmp, "tiny"), charset=CHARSET)
        for recipe in recipes:
            row: dict[str, Any] = {"recipe": recipe.name, "bxa": f"{recipe.bs}x{recipe.ga}", "gc": recipe.gc,
                                   "settings": asdict(recipe), "device": desc, "config": a.config,
                                   "steps": a.steps}
            try:
                if a.deadline is not None and time.time() >= a.deadline:
                    row["status"] = "skipped: time budget"
                else:
                    row |= run_recipe(recipe, a, tiny_dir, data_dir, device) | {"status": "ok"}
            except torch.OutOfMemoryError:
                row["status"] = "OOM at cap" if a.memory_cap_gb else "OOM"
            gc.collect()  # this recipe's model, optimizer state and loader workers go before the next one
            row["peak_gib"] = row["reserved_gib"] = row["mfu"] = None
            if device.type == "cuda" and not row["status"].startswith("skipped"):
                torch.cuda.empty_cache()
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            if peak and row["status"] == "ok":
                row["mfu"] = row["model_flops_per_s"] / peak
            rows.append(row)
            print(f"  {recipe.name}: {row['status']}", flush=True)
            if a.json:  # after every recipe: a run killed later keeps these rows
                tmp_json = Path(f"{a.json}.tmp")
                tmp_json.write_text(json.dumps(rows, indent=1) + "\n")
                tmp_json.replace(a.json)  # atomic: a kill mid-write never leaves half a file
    print_table(rows)
    return 0 if all(r.get("check", {"ok": True})["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
