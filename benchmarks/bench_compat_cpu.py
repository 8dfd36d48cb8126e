"""What a manga reader without a GPU can expect: manga_ocr_compat.MangaOcr's crops/s on CPU, full-size model.

    python benchmarks/bench_compat_cpu.py                      # 8 crops at batch 1, then batched (8)
    python benchmarks/bench_compat_cpu.py --num_samples 16 --batch_size 16 --threads 2

The model is the full-size (0.9B) PaddleOCR-VL architecture with random weights (benchmarks/full_size.py: the
release-like tokenizer and template, the release's pixel bounds, so every crop is upscaled to >= 147,384 px,
~190 image tokens), fp32, on realistic crops cut from synthetic full-size pages. Random weights rarely emit
</s>, so every crop generates exactly --max_new_tokens tokens (default 16, about one manga text line); a
trained model stops at the end of the text.
Batch 1 is `mocr(crop)` once per crop, as manga-ocr's tools call it; batched is `mocr.batch(crops)`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare_manga109_data as prep  # noqa: E402
from benchmarks.bench_eval import full_size_random  # noqa: E402
from evaluate_model import device_description  # noqa: E402
from manga_ocr_compat import MangaOcr  # noqa: E402
from ocr_dataset import load_image, read_jsonl  # noqa: E402
from tools.make_synthetic_manga109 import generate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_samples", type=int, default=8, help="crops timed at batch 1 and batched")
    ap.add_argument("--batch_size", type=int, default=8, help="batch of the batched run")
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if min(a.num_samples, a.batch_size, a.max_new_tokens, a.threads) <= 0:
        print("error: --num_samples, --batch_size, --max_new_tokens and --threads must be positive",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        release, data = Path(tmp, "m109"), Path(tmp, "data")
        generate(release, books=1, pages=4, seed=a.seed)
        prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data), split_mode="random",
                                       num_workers=1))
        records = [r for s in prep.SPLITS for r in read_jsonl(data / f"{s}.jsonl")]
        records = random.Random(a.seed).sample(records, min(a.num_samples, len(records)))
        images = [load_image(r, "bench") for r in records]
        t = time.perf_counter()
        model, processor = full_size_random("cpu", torch.float32)
        build_s = time.perf_counter() - t

    mocr = MangaOcr.from_model(model, processor, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    mocr(images[0])  # warm-up outside the timings (one-off allocations), as manga-ocr does at load
    load = os.getloadavg()[0]
    t = time.perf_counter()
    single = [mocr(im) for im in images]
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = mocr.batch(images)
    t_batched = time.perf_counter() - t
    load_after = os.getloadavg()[0]

    n = len(images)
    params = sum(p.numel() for p in model.parameters())
    sizes = sorted(im.width * im.height for im in images)
    print(f"device: {device_description('cpu')}, fp32; load average {load:.2f} before, "
          f"{load_after:.2f} after ({os.cpu_count()} cores)")
    print(f"model: full-size random ({params / 1e9:.2f} B parameters, built in {build_s:.0f} s), {n} crops "
          f"(median {sizes[n // 2]} px before upscaling), max_new_tokens {a.max_new_tokens}")
    print(f"{'path':34s} {'seconds':>8s} {'s/crop':>7s} {'crops/s':>8s}")
    runs = (("mocr(crop), batch 1", t_single), (f"mocr.batch(crops), batch {a.batch_size}", t_batched))
    for label, s in runs:
        print(f"{label:34s} {s:8.1f} {s / n:7.2f} {n / s:8.3f}")
    same = sum(x == y for x, y in zip(single, batched, strict=True))
    print(f"identical texts: {same}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
