"""What a reading's confidence costs on CPU: generate_readings with and without its logits processor.

TokenProbabilities against the same calls with that processor replaced by a no-op, fp32, side by side in one
run.

    python benchmarks/bench_confidence.py                          # tiny and full-size, 4 crops each
    python benchmarks/bench_confidence.py --model full --num_samples 8 --threads 2

The confidence is read from the logits generate() computes anyway (no second forward pass): what it adds is
one log-softmax over the vocabulary per generated token and batch row (103,424 ids on the full-size model),
kept on the device until the call ends. The no-op processor is called at the same steps and returns the
scores untouched, so the two rows differ by exactly that work.

Models: the tiny fixture model (tools/make_tiny_model.py) and the full-size (0.9B) PaddleOCR-VL with random
weights (benchmarks/full_size.py, as bench_compat_cpu.py builds it), on crops cut from synthetic pages.
Every crop generates exactly --max_new_tokens tokens (min_new_tokens = max_new_tokens: random weights stop
at random). Per model, batch 1 (one call per crop) and one batch of every crop; the two variants take turns
call by call (with, no-op, no-op, with, ...), so a shared machine's drifting load falls on both alike.
Printed per row: median seconds per call of each, their ratio, the overhead per generated token, and the
range of the 1-minute load average (os.getloadavg) over the row's calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.model.generation as generation  # noqa: E402
from benchmarks.bench_compat_cpu import crops, physical_cores  # noqa: E402
from benchmarks.bench_eval import full_size_random  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402

MEASURED = generation.TokenProbabilities


class NoProbabilities:
    """TokenProbabilities' stand-in that computes nothing: it counts the steps and answers 0.0 for each."""

    def __init__(self) -> None:
        self.steps, self.batch = 0, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps, self.batch = self.steps + 1, scores.shape[0]
        return scores

    def rows(self) -> list[list[float]]:
        return [[0.0] * self.steps for _ in range(self.batch)]


def read(model: Any, processor: Any, images: list, batch_size: int, max_new_tokens: int,
         processor_class: type) -> list:
    generation.TokenProbabilities = processor_class  # looked up at each call by _generate_chunk
    try:
        return generation.generate_readings(model, processor, images, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens)
    finally:
        generation.TokenProbabilities = MEASURED


def time_pair(call: Callable[[type], list], repeats: int) -> dict:
    """Both variants `repeats` times, alternating (ABBA...), after one warm-up call each."""
    call(MEASURED)
    call(NoProbabilities)
    seconds: dict[type, list[float]] = {MEASURED: [], NoProbabilities: []}
    loads, texts = [], {}
    for k in range(repeats):
        for cls in (MEASURED, NoProbabilities) if k % 2 == 0 else (NoProbabilities, MEASURED):
            loads.append(os.getloadavg()[0])
            t = time.perf_counter()
            readings = call(cls)
            seconds[cls].append(time.perf_counter() - t)
            texts[cls] = [r.text for r in readings]
    return {"with": statistics.median(seconds[MEASURED]), "noop": statistics.median(seconds[NoProbabilities]),
            "loads": loads, "same_texts": texts[MEASURED] == texts[NoProbabilities],
            "confidences": [r.confidence for r in call(MEASURED)]}


def processor_alone(vocab: int, batch: int, steps: int = 200) -> float:
    """Milliseconds one TokenProbabilities call takes on (batch, vocab) fp32 scores, timed by itself: the
    whole of what the confidence adds per step, free of the model's far larger and noisier step time."""
    scores, ids = torch.randn(batch, vocab), torch.zeros(batch, 1, dtype=torch.long)
    probe = MEASURED()
    probe(ids, scores)  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        probe(ids, scores)
    elapsed = time.perf_counter() - t
    probe.rows()  # and the one transfer at the end, as generation does
    return 1000 * elapsed / steps


def build(name: str, tmp: str) -> tuple[Any, Any]:
    if name == "tiny":
        return load_model_and_processor(build_tiny_model(Path(tmp, "tiny"), charset=CHARSET),
                                        dtype=torch.float32)
    return full_size_random("cpu", torch.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "full", "both"), default="both")
    ap.add_argument("--num_samples", type=int, default=4, help="crops per model")
    ap.add_argument("--max_new_tokens", type=int, default=16, help="tokens generated per crop (forced)")
    ap.add_argument("--repeats", type=int, default=4, help="timed calls of each variant per crop or batch")
    ap.add_argument("--threads", type=int, default=physical_cores(),
                    help="torch CPU threads (default: the physical cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if min(a.num_samples, a.max_new_tokens, a.repeats, a.threads) <= 0:
        print("error: --num_samples, --max_new_tokens, --repeats and --threads must be positive",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    load_before = os.getloadavg()[0]
    results = []
    for name in ("tiny", "full") if a.model == "both" else (a.model,):
        images = crops(a.num_samples, a.seed, name == "tiny")
        with tempfile.TemporaryDirectory() as tmp:
            model, processor = build(name, tmp)
        model.generation_config.min_new_tokens = a.max_new_tokens  # every call generates the same tokens
        vocab = model.get_output_embeddings().weight.shape[0]
        for batch in (1, len(images)):
            per_call = [images] if batch > 1 else [[im] for im in images]
            stats = [time_pair(partial(read, model, processor, ims, batch, a.max_new_tokens), a.repeats)
                     for ims in per_call]
            with_s, noop_s = sum(s["with"] for s in stats), sum(s["noop"] for s in stats)
            loads = [x for s in stats for x in s["loads"]]
            results.append((name, vocab, batch, len(images), with_s, noop_s, loads,
                            all(s["same_texts"] for s in stats),
                            [c for s in stats for c in s["confidences"]], processor_alone(vocab, batch)))
            print(f"{name} batch {batch}: {with_s:.3f} s with, {noop_s:.3f} s no-op", file=sys.stderr)
        del model

    print(f"device: cpu ({os.cpu_count()} logical CPUs, {physical_cores()} physical cores usable), threads: "
          f"{a.threads}, fp32, torch {torch.__version__}; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"{a.max_new_tokens} tokens generated per crop (forced); each variant timed {a.repeats}x per call, "
          "alternating; seconds: sum over the crops of each call's median")
    print(f"{'model':6s} {'vocab':>7s} {'batch':>5s} {'crops':>5s} {'with (s)':>9s} {'no-op (s)':>9s} "
          f"{'ratio':>7s} {'ms/token':>9s} {'alone':>7s} {'share':>7s}  {'load avg':9s} identical texts  "
          "confidence range")
    for name, vocab, batch, n, with_s, noop_s, loads, same, confs, alone_ms in results:
        per_token = 1000 * (with_s - noop_s) / (n * a.max_new_tokens)
        steps = a.max_new_tokens * (n // batch)  # generate() steps over all the calls of the row
        share = alone_ms * steps / (1000 * noop_s)
        print(f"{name:6s} {vocab:7d} {batch:5d} {n:5d} {with_s:9.3f} {noop_s:9.3f} {with_s / noop_s:6.3f}x "
              f"{per_token:+9.3f} {alone_ms:7.3f} {share:7.2%}  {min(loads):.1f}-{max(loads):.1f}   "
              f"{'yes' if same else 'NO':15s} {min(confs):.3g}-{max(confs):.3g}")
    print("ratio: with / no-op (1.000x: no cost); ms/token: their difference per generated token and crop; "
          "alone: ms of one processor call (one step, the whole batch) timed by itself; share: alone x the "
          "row's steps / the no-op row's time, the overhead free of the model's noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
