"""Measure the activation memory one training micro-batch saves for backward, next to memory_plan's estimate.

    python benchmarks/bench_memory_plan.py --config tiny                        # seconds
    python benchmarks/bench_memory_plan.py --config full --mode bf16_lean fp32_master lora \
        --batch_size 1 2 --crop 120x380 400x700 --gc 0 1                        # minutes on 2 CPU cores

Runs one forward of sft's answer_loss on the CPU under torch.autocast("cpu", bf16), so that activations have
the dtypes they have on a GPU under --bf16, with two CUDA behaviours mimicked: autocast runs layer_norm in
fp32 on CUDA (natively in bf16 on the CPU), and CUDA's dropout saves a bool mask (the CPU's a float noise
tensor). Every tensor autograd saves is seen through torch.autograd.graph.saved_tensors_hooks and counted
once per storage, by the part of the model that saved it; parameters and buffers are not activations, and
copies of parameters (autocast's bf16 casts, kept for the matmul backward) are counted apart, next to the
plan's autocast_copies (which also holds the cached bias copies, never saved, and, for fp32_master, every
cast weight, which autocast's cache keeps even where checkpointing saves nothing).

A tensor counts only if something still holds it when the forward ends (weak references). With
non-reentrant gradient checkpointing a layer's own ops are packed by the checkpoint's hooks, not ours: what
is seen is what the checkpoint keeps, each layer's inputs (its keyword arguments, the mask and rotary cos/sin,
are kept outside autograd: the inputs of every checkpointable layer are tracked too). Not measured: the
plan's transient terms (the logits peak, the layer recomputed under checkpointing), in their own column.

Batches are blank crops of the given sizes (all rows of a batch the same crop, answers of slightly different
lengths, so there is padding), collated by OCRCollator with the model's processor (full: the release-like
processor, min_pixels 147384: a small crop becomes ~188 image tokens). The plan is given the batch's real
logit positions (its default assumes the worst case for B > 1; the last column shows what sft would print).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.train.trainer as sft_trainer  # noqa: E402
from paddleocr_vl_manga.data.collator import OCRCollator  # noqa: E402
from paddleocr_vl_manga.model.lora import add_lora, is_lora  # noqa: E402
from paddleocr_vl_manga.train.memory_plan import memory_plan  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET  # noqa: E402

PARTS = ("vision", "projector", "decoder", "logits")


def build(config: str, dtype: torch.dtype, tmp: str) -> tuple[Any, Any]:
    torch.manual_seed(0)
    if config == "full":
        from benchmarks.full_size import build_full_size_random

        return build_full_size_random(dtype=dtype, device="cpu")
    from paddleocr_vl_manga.model.loading import load_model_and_processor
    from tools.make_tiny_model import build_tiny_model

    folder = Path(tmp, "tiny")
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, charset=CHARSET)
    return load_model_and_processor(str(folder), dtype=dtype, attn_implementation="sdpa")


def make_batch(processor: Any, crop: tuple[int, int], batch_size: int, answer_chars: int) -> dict:
    """Blank crops of one size with random answers of answer_chars, answer_chars + 1, ... characters."""
    rng = random.Random(0)
    texts = ["".join(rng.choices(CHARSET, k=answer_chars + i)) for i in range(batch_size)]
    examples = [{"image": Image.new("RGB", crop, "white"), "text": t} for t in texts]
    return OCRCollator(processor, max_length=None)(examples)


def set_checkpointing(model: Any, on: bool) -> None:
    """Non-reentrant gradient checkpointing on or off (activation_checkpointing_*: transformers' newer names,
    the old ones warn)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


@contextlib.contextmanager
def cuda_like_cpu_autocast() -> Iterator[None]:
    """layer_norm in fp32 under autocast and dropout saving a bool mask, as on CUDA."""
    layer_norm, dropout = F.layer_norm, F.dropout

    def fp32_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return layer_norm(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            up = [None if t is None else t.float() for t in (weight, bias)]
            return layer_norm(x.float(), shape, *up, eps)

    def native_dropout(x, p=0.5, training=True, inplace=False):
        return torch.native_dropout(x, p, training)[0] if training and p > 0 else x

    F.layer_norm, F.dropout = fp32_layer_norm, native_dropout
    try:
        yield
    finally:
        F.layer_norm, F.dropout = layer_norm, dropout


def saved_tensor_bytes(model: Any, batch: dict, autocast: bool = True) -> dict[str, int]:
    """Bytes autograd saves in one forward of answer_loss (under CPU bf16 autocast unless told), per part of
    the model (each storage once; parameters and buffers left out; copies of parameters: 'weight_copies')."""
    base = model.get_base_model() if is_lora(model) else model
    where = {base.model.visual: "vision", base.model.projector: "projector",
             base.model.language_model: "decoder"}
    current = ["logits"]  # lm_head, the loss and everything outside the three parts
    handles = []
    for module, part in where.items():
        handles.append(module.register_forward_pre_hook(lambda *_, p=part: current.append(p)))
        handles.append(module.register_forward_hook(lambda *_: current.pop() and None))
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # Weak references: a tensor counts only if something still holds it when the forward ends (a checkpoint
    # packs a frozen layer's inputs, then drops them with the layer's graph).
    saved: dict[int, tuple[list[weakref.ref], str]] = {}

    def track(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in owned:
            return
        refs, _ = saved.get(ptr, ([], None))
        if any(r() is not None for r in refs):  # another view of a live storage
            refs.append(weakref.ref(t))
        else:  # new, or a freed storage's address reused
            saved[ptr] = ([weakref.ref(t)], current[-1])

    def pack(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()  # the tensor itself would make an output saved by its own grad_fn a leaking cycle
        track(t)
        return t

    def layer_inputs(module, args, kwargs) -> None:
        # A checkpointed layer's keyword arguments (mask, rotary cos/sin) are kept for the recomputation by
        # the checkpoint, outside autograd's saved tensors
        for v in [*args, *kwargs.values()]:
            for t in v if isinstance(v, tuple | list) else [v]:
                if torch.is_tensor(t):
                    track(t)

    handles += [m.register_forward_pre_hook(layer_inputs, with_kwargs=True) for m in model.modules()
                if isinstance(m, GradientCheckpointingLayer)]
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    try:
        with cuda_like_cpu_autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = sft_trainer.answer_loss(model, batch, n_items)[0]
    finally:
        for h in handles:
            h.remove()
    gc.collect()
    by_numel = defaultdict(list)
    for p in model.parameters():
        by_numel[p.numel()].append(p)
    out = dict.fromkeys((*PARTS, "weight_copies"), 0)
    with torch.no_grad():
        for refs, part in saved.values():
            t = next((t for t in (r() for r in refs) if t is not None), None)
            if t is None:
                continue
            storage = t.untyped_storage()
            flat = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),))
            copy = any(p.dtype != t.dtype and torch.equal(flat, p.reshape(-1).to(t.dtype))
                       for p in by_numel.get(flat.numel(), []))
            out["weight_copies" if copy else part] += storage.nbytes()
    saved.clear()
    del loss  # frees the graph: no backward needed to count what it would use
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--mode", nargs="+", choices=["fp32_master", "bf16_lean", "lora"],
                    default=["bf16_lean", "fp32_master", "lora"])
    ap.add_argument("--lora_precision", choices=["fp32_master", "bf16_lean"], default="bf16_lean")
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--lora_targets", default="language")
    ap.add_argument("--batch_size", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--crop", nargs="+", default=["120x380", "400x700"], help="crop sizes WxH (one per run)")
    ap.add_argument("--answer_chars", type=int, default=20)
    ap.add_argument("--gc", type=int, nargs="+", choices=[0, 1], default=[0, 1])
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    crops = [tuple(int(v) for v in c.lower().split("x")) for c in a.crop]
    unit, mb = ("KiB", 2**10) if a.config == "tiny" else ("MiB", 2**20)
    print(f"torch {torch.__version__} on {os.cpu_count()} CPU cores ({torch.get_num_threads()} threads), "
          f"config {a.config}; {unit} kept for backward, measured (CPU, CUDA-like bf16 autocast) / planned;\n"
          "transient: the plan's transient part; sft plan: its whole activation figure as sft computes it")
    head = "{:12} {:>2} {:>2} {:>9} {:>5} {:>4} {:>4} " + " ".join(["{:>15}"] * 5) + " {:>9} {:>9}"
    print(head.format("mode", "B", "gc", "crop", "seq", "img", "keep", *PARTS, "total (ratio)",
                      "transient", "sft plan"))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.mode:
            precision = a.lora_precision if mode == "lora" else mode
            dtype = torch.float32 if precision == "fp32_master" else torch.bfloat16
            model, processor = build(a.config, dtype, tmp)
            model.config.use_cache = False
            for gc_on in a.gc:
                set_checkpointing(model, bool(gc_on))
                lora = mode == "lora"  # as sft with --lora_r R: alpha 2 R, dropout 0.05
                net = add_lora(model, a.lora_r, a.lora_targets) if lora else model
                net.train()
                for bs in a.batch_size:
                    for crop in crops:
                        batch = make_batch(processor, crop, bs, a.answer_chars)
                        t0 = time.perf_counter()
                        got = saved_tensor_bytes(net, batch)
                        seconds = time.perf_counter() - t0
                        seq = batch["input_ids"].shape[1]
                        img = int(batch["image_grid_thw"].prod(-1).max()) // 4
                        keep = int((batch["labels"][:, 1:] != -100).any(0).sum())
                        kw = {"batch_size": bs, "seq_len": seq, "image_tokens": img,
                              "gradient_checkpointing": bool(gc_on), "bf16_autocast": True,
                              "lora_r": a.lora_r, "lora_targets": a.lora_targets, "lora_precision": precision}
                        plan = next(r for r in memory_plan(model.config, logit_positions=keep, **kw)
                                    if r.mode == mode)
                        sft_plan = next(r for r in memory_plan(model.config, **kw) if r.mode == mode)
                        want = plan.activation_parts
                        cells = [f"{got[p] / mb:.1f}/{want[p] / mb:.1f}" for p in PARTS]
                        measured, planned = sum(got[p] for p in PARTS), sum(want[p] for p in PARTS)
                        ratio = planned / measured
                        worst = max(worst, abs(ratio - 1))
                        cells.append(f"{measured / mb:.0f}/{planned / mb:.0f} ({ratio:.2f})")
                        print(head.format(mode, bs, gc_on, "x".join(map(str, crop)), seq, img, keep,
                                          *cells, f"{want['transient'] / mb:.0f}",
                                          f"{sft_plan.activations / mb:.0f}"),
                              f" [{seconds:.0f} s; weight copies {got['weight_copies'] / mb:.0f}, plan's "
                              f"autocast column {plan.autocast_copies / mb:.0f}]", flush=True)
                if lora:
                    net.unload()  # the plain model again, for the next checkpointing setting
            del model, net
    print(f"largest deviation of the planned total from the measured one: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
