"""Per-split extremes of a prepared folder: longest sequence per processor, thin/tiny crops, long texts.

Tells whether a dataset (the real prepared Manga109s, or the --extremes synthetic fixture) holds the cases
that break code in the field: sequences over a reduced max_length, thin or tiny crops, 100+ character answers
with Latin letters and digits. Lengths come from data.lengths.sequence_lengths, as training counts them.

    python tools/split_stats.py data/manga109s --model PaddlePaddle/PaddleOCR-VL --model ./tiny_model
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tools/split_stats.py`: the repo's modules sit one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = ("train", "val", "test")
TINY_SIDE = 16  # both sides at most this (px)
THIN_SIDE, THIN_ASPECT = 16, 10  # short side at most THIN_SIDE and long side at least THIN_ASPECT times it
LONG_CHARS = 100


def is_thin(w: int, h: int) -> bool:
    return min(w, h) <= THIN_SIDE and max(w, h) >= THIN_ASPECT * min(w, h)


def is_tiny(w: int, h: int) -> bool:
    return max(w, h) <= TINY_SIDE


def has_latin_and_digit(text: str) -> bool:
    # NFKC folds full-width ＡＢ１２ to ASCII, so both widths count.
    folded = unicodedata.normalize("NFKC", text)
    ascii_chars = [c for c in folded if c.isascii()]
    return any(c.isalpha() for c in ascii_chars) and any(c.isdigit() for c in ascii_chars)


def split_stats(data_dir: str | Path, processors: dict[str, Any], threshold: int = 600) -> dict[str, dict]:
    """{split: {books, crops, thin, tiny, long, long_latin_digits, max_tokens: {name: n}, over: {name: n}}};
    `over` counts sequences longer than `threshold` tokens. processors: {name: a loaded processor}."""
    from paddleocr_vl_manga.data.dataset import OCRDataset
    from paddleocr_vl_manga.data.lengths import sequence_lengths

    stats = {}
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.is_file():
            continue
        ds = OCRDataset(path)
        sizes = ds.image_sizes()
        texts = [r["text"] for r in ds.records]
        s: dict[str, Any] = {
            "books": len({r.get("book", "") for r in ds.records}),
            "crops": len(ds),
            "thin": sum(is_thin(w, h) for w, h in sizes),
            "tiny": sum(is_tiny(w, h) for w, h in sizes),
            "long": sum(len(t) >= LONG_CHARS for t in texts),
            "long_latin_digits": sum(len(t) >= LONG_CHARS and has_latin_and_digit(t) for t in texts),
            "max_tokens": {},
            "over": {},
        }
        for name, processor in processors.items():
            lengths = sequence_lengths(ds, processor) if len(ds) else [0]
            s["max_tokens"][name] = max(lengths)
            s["over"][name] = sum(n > threshold for n in lengths)
        stats[split] = s
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", help="a folder written by prepare_manga109_data.py")
    ap.add_argument("--model", action="append", default=[], help="checkpoint whose processor counts tokens")
    ap.add_argument("--threshold", type=int, default=600, help="count sequences longer than this (tokens)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    from paddleocr_vl_manga.model.loading import load_config_and_processor

    processors = {m: load_config_and_processor(m).processor for m in args.model}
    stats = split_stats(args.data_dir, processors, args.threshold)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=1))
        return 0
    for split, s in stats.items():
        print(f"{split:5s}: {s['books']} books, {s['crops']} crops, {s['thin']} thin, {s['tiny']} tiny, "
              f"{s['long']} texts of {LONG_CHARS}+ chars ({s['long_latin_digits']} with Latin and digits)")
        for name in processors:
            print(f"       {name}: longest {s['max_tokens'][name]} tokens, "
                  f"{s['over'][name]} over {args.threshold}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
