"""Time prepare_manga109_data.py against a plain loop that reopens the page image for every crop.

    python benchmarks/bench_prepare.py --books 4 --pages 12

Both run on the same synthetic Manga109-format release (full-size 1654x1170 pages) and write the same PNG
crops, so the ratio isolates what the script does differently: one decode per page and a process pool.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lxml import etree
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_synthetic_manga109 import generate  # noqa: E402

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402


def naive_prepare(root: Path, out: Path, min_size: int = 10) -> int:
    """What a first version looks like: one Image.open per text box, single process."""
    n = 0
    for title in sorted((root / "books.txt").read_text(encoding="utf-8").split()):
        tree = etree.parse(str(root / "annotations" / f"{title}.xml"))
        for page in tree.iterfind(".//pages/page"):
            index = int(page.get("index"))
            for t in page.findall("text"):
                box = [int(t.get(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                if not (t.text or "").strip() or box[2] - box[0] < min_size or box[3] - box[1] < min_size:
                    continue
                with Image.open(root / "images" / title / f"{index:03d}.jpg") as im:
                    crop = im.crop(
                        (max(box[0], 0), max(box[1], 0), min(box[2], im.width), min(box[3], im.height))
                    )
                    dst = out / "crops" / title / f"{index:03d}_{t.get('id')}.png"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    crop.save(dst, format="PNG", compress_level=1)
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", type=int, default=4)
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "m109", books=a.books, pages=a.pages, seed=a.seed)

        t = time.perf_counter()
        n_naive = naive_prepare(tmp / "m109", tmp / "naive")
        naive_s = time.perf_counter() - t

        args = prep.PrepareArguments(
            manga109_root=str(tmp / "m109"),
            output_dir=str(tmp / "ours"),
            num_workers=a.num_workers,
            test_fraction=0.25,
            val_fraction=0.25,
        )
        t = time.perf_counter()
        manifest = prep.run(args)
        ours_s = time.perf_counter() - t

    print(f"\n{a.books} books x {a.pages} pages (1654x1170), {os.cpu_count()} CPUs")
    print(f"{'method':44s} {'crops':>6s} {'seconds':>8s} {'crops/s':>8s}")
    label = "naive (reopen page per crop, 1 process)"
    print(f"{label:44s} {n_naive:6d} {naive_s:8.2f} {n_naive / naive_s:8.1f}")
    label = f"prepare_manga109_data.py ({a.num_workers} workers)"
    print(f"{label:44s} {manifest['crops']:6d} {ours_s:8.2f} {manifest['crops'] / ours_s:8.1f}")
    print(f"speed-up: {(manifest['crops'] / ours_s) / (n_naive / naive_s):.1f}x")


if __name__ == "__main__":
    main()
