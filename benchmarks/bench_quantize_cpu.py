"""fp32 against int8 (model.quantize.quantize_model) on CPU: seconds per crop at batch 1, as readers call it.

    python benchmarks/bench_quantize_cpu.py --threads 2                    # 8 crops, 16 new tokens
    python benchmarks/bench_quantize_cpu.py --methods fp32 int8 --min_pixels 50176

The model is the full-size (0.9B) architecture with random weights (benchmarks/bench_eval.full_size_random:
ids past the small tokenizer get zero logits), crops cut from synthetic full-size pages. Random weights rarely
emit </s>, so every crop generates exactly --max_new_tokens tokens. Each method is its own copy of the model;
every crop runs through the methods back to back, in repeated passes, and keeps each method's fastest time,
so load from other processes on the machine hurts no method more than another. The time of a crop is split
with forward hooks into
  vision   the vision encoder and projector (transformers 5.24 runs them before the first forward)
  prefill  the rest of the first forward: the language model over prompt and image tokens
  decode   the other forwards, one per new token
  other    generate()'s own work and the processor (total minus the three).
Identical texts compare each int8 method with fp32 (random weights: near-ties flip easily).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402
from benchmarks.bench_eval import full_size_random  # noqa: E402
from paddleocr_vl_manga.data.collator import configure_image_size, num_image_tokens  # noqa: E402
from paddleocr_vl_manga.data.dataset import load_image, read_jsonl  # noqa: E402
from paddleocr_vl_manga.model.generation import generate_texts  # noqa: E402
from paddleocr_vl_manga.model.quantize import METHODS, quantize_model  # noqa: E402
from tools.make_synthetic_manga109 import generate  # noqa: E402

PARTS = ("vision", "prefill", "decode", "other")


class Split:
    """Forward hooks that add up the seconds spent in the vision side and in each language-model forward.

    transformers 5.24's generate() computes the image features before the first forward
    (_prepare_multimodal_encoder_kwargs_for_generation); older versions did it inside it: both are handled.
    """

    def __init__(self, model: Any) -> None:
        self.forwards: list[float] = []
        self.vision = self.vision_inside = 0.0
        self._t: dict[str, float] = {}
        for name, module in (("model", model), ("visual", model.model.visual),
                             ("projector", model.model.projector)):
            module.register_forward_pre_hook(self._start(name))
            module.register_forward_hook(self._stop(name))

    def _start(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self._t[name] = time.perf_counter()
        return hook

    def _stop(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            dt = time.perf_counter() - self._t.pop(name)
            if name == "model":
                self.forwards.append(dt)
                return
            self.vision += dt
            if "model" in self._t:  # inside a language-model forward: not part of its prefill time
                self.vision_inside += dt
        return hook

    def reset(self) -> None:
        self.forwards, self.vision, self.vision_inside = [], 0.0, 0.0

    def parts(self, total: float) -> dict[str, float]:
        prefill = self.forwards[0] - self.vision_inside
        decode = sum(self.forwards[1:])
        return {"vision": self.vision, "prefill": prefill, "decode": decode,
                "other": total - self.vision - prefill - decode}


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the float parameters and buffers plus the int8 weights (a quantized linear's state_dict entry
    is a (weight, bias) tuple)."""
    values = model.state_dict().values()
    tensors = [t for v in values for t in (v if isinstance(v, tuple) else (v,))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fp32", *METHODS], choices=["fp32", *METHODS])
    ap.add_argument("--min_pixels", type=int, nargs="+", default=[147384, 50176],
                    help="pixel budgets (the release's 147384 is ~190 image tokens; 50176 is ~64)")
    ap.add_argument("--num_samples", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the crops; each keeps its fastest")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        release, data = Path(tmp, "m109"), Path(tmp, "data")
        generate(release, books=1, pages=4, seed=a.seed, progress=False)
        prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data), split_mode="random",
                                       num_workers=1))
        records = [r for s in prep.SPLITS for r in read_jsonl(data / f"{s}.jsonl")]
        records = random.Random(a.seed).sample(records, min(a.num_samples, len(records)))
        images = [load_image(r, "bench") for r in records]

    fp32, processor = full_size_random("cpu", torch.float32)
    models: dict[str, Any] = {}
    for method in a.methods:
        if method == "fp32":
            models[method] = fp32
            continue
        t = time.perf_counter()
        models[method] = quantize_model(copy.deepcopy(fp32), method)
        print(f"quantize_model(..., {method!r}): {time.perf_counter() - t:.1f} s", flush=True)
    if "fp32" not in a.methods:
        del fp32
    splits = {m: Split(model) for m, model in models.items()}

    print(f"threads {a.threads}, {len(images)} crops, {a.max_new_tokens} new tokens, batch 1, "
          f"{a.repeats} passes, methods back to back on each crop")
    for method, model in models.items():
        print(f"{method:10s} weights {parameter_bytes(model) / 2**30:.2f} GiB")
    for min_pixels in a.min_pixels:
        configure_image_size(processor, min_pixels=min_pixels)
        tokens = sorted(num_image_tokens(processor, *im.size) for im in images)
        best: dict[str, list[dict[str, float]]] = {m: [{"total": float("inf")}] * len(images) for m in models}
        texts: dict[str, list[str]] = {m: [""] * len(images) for m in models}
        for model in models.values():  # warm-up outside the timings (one-off allocations, packing)
            generate_texts(model, processor, images[:1], batch_size=1, max_new_tokens=2)
        loads = [os.getloadavg()[0]]
        for _ in range(a.repeats):
            for i, im in enumerate(images):
                for method, model in models.items():  # back to back on the same crop: same load
                    splits[method].reset()
                    t = time.perf_counter()
                    texts[method][i] = generate_texts(model, processor, [im], batch_size=1,
                                                      max_new_tokens=a.max_new_tokens)[0]
                    total = time.perf_counter() - t
                    if total < best[method][i]["total"]:
                        best[method][i] = {"total": total, **splits[method].parts(total)}
            loads.append(os.getloadavg()[0])
        print(f"\nmin_pixels {min_pixels}: image tokens per crop {tokens[0]}-{tokens[-1]} (median "
              f"{tokens[len(tokens) // 2]}); load average {min(loads):.1f}-{max(loads):.1f} "
              f"({os.cpu_count()} cores)")
        print(f"{'method':10s} {'s/crop':>7s} {'speedup':>8s} " + " ".join(f"{p:>8s}" for p in PARTS)
              + "  identical to fp32")
        base = None
        for method in models:
            n = len(images)
            mean = {k: sum(b[k] for b in best[method]) / n for k in ("total", *PARTS)}
            base = base or mean["total"]
            same = sum(x == y for x, y in zip(texts[method], texts.get("fp32", texts[method]), strict=True))
            print(f"{method:10s} {mean['total']:7.2f} {base / mean['total']:7.2f}x "
                  + " ".join(f"{mean[p]:8.2f}" for p in PARTS) + f"  {same}/{n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
