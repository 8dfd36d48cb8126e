"""Lines per second of synthesize_lines.py with everything on (page backgrounds included).

    python benchmarks/bench_synth.py --num_lines 6000 --num_workers 2

A synthetic Manga109-format release (full-size pages) is prepared first, so lines draw texts and backgrounds
from a train split as they would from the real one. The font scan is done (and cached) before timing: it is a
one-off cost per machine, printed separately. The load average is printed too, since other processes on the
machine slow rendering down.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_synthetic_manga109 import generate  # noqa: E402

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402
import paddleocr_vl_manga.data.synth.run as synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_lines", type=int, default=6000)
    ap.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "m109", books=4, pages=6, seed=a.seed, progress=False)
        prep.run(prep.PrepareArguments(manga109_root=str(tmp / "m109"), output_dir=str(tmp / "prep"),
                                       num_workers=a.num_workers))
        args = synth.SynthArguments(out=str(tmp / "warm"), num_lines=1, num_workers=a.num_workers,
                                    manga109_dir=str(tmp / "prep"), seed=a.seed)
        t0 = time.time()
        synth.run(args)  # font scan (cached afterwards), wordfreq load
        warm = time.time() - t0
        load = os.getloadavg()[0]
        args.out, args.num_lines = str(tmp / "synth"), a.num_lines
        s = synth.run(args)
        rate = s["lines_made"] / s["seconds"]
        print(f"fonts: {s['fonts']} {s['styles']}; warm-up (font scan, word list) {warm:.1f} s")
        print(f"stats: {s['stats']}")
        print(f"{a.num_lines} lines, {a.num_workers} workers, {os.cpu_count()} cores, "
              f"load average {load:.2f} before: {s['seconds']:.1f} s including start-up")
        print(f"lines/s: {rate:.0f}")


if __name__ == "__main__":
    main()
