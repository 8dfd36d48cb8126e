"""The GPU suite's data and fixtures, built once per suite and shared by every part (gpu_suite.py).

    python benchmarks/gpu_fixtures.py OUT_DIR [--smoke]      # prints what it built, as JSON

OUT_DIR/data: synthetic full-size pages (the real data's extremes on each book's first page: 100+ character
texts, 10 x 400 strips, a 12 x 12 box), prepared into one train.jsonl (random split, nothing held out), plus
LONG_CROPS crops as long as MAX_LENGTH allows: the longest crop, enlarged until its sample (prompt + image
tokens + answer + eos) is the longest that still fits. A recipe's peak memory is set by its longest batch, and
a batch is padded to its longest row, so the timed data must hold such a crop: the extremes alone reach ~965
tokens with the release-like processor, the default pages ~280. With no more crops than a GPU part's first
12 steps draw (12 x 16 = 192), every crop, the long ones included, is in the timed or warm-up steps.
OUT_DIR/tiny (--smoke only): the tiny model; full mode builds none (its parts use the full-size model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_LENGTH = 1536  # bench_train.MAX_LENGTH, sft's default --max_length
LONG_CROPS = 1
SIZES = {"gpu": {"books": 2, "pages": 8}, "smoke": {"books": 1, "pages": 3}}


def processor_for(mode: str, tiny_dir: Path | None) -> Any:
    """The processor the parts use: the tiny model's (smoke), else the release-like one (full_size.py)."""
    if mode == "smoke":
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(tiny_dir)
    from transformers import PaddleOCRVLConfig

    from paddleocr_vl_manga.model.loading import ensure_release_prompt
    from tools.make_tiny_model import release_processor

    processor = release_processor("v1")
    ensure_release_prompt(PaddleOCRVLConfig(), processor, lambda: "the release-like v1 chat template")
    return processor


def add_long_crops(data_dir: Path, processor: Any, n: int, max_length: int = MAX_LENGTH) -> list[dict]:
    """Append n enlarged copies of the longest crop to train.jsonl, each as long as max_length allows;
    returns their records with "length" (tokens) and "image_tokens"."""
    from paddleocr_vl_manga.data.dataset import OCRDataset
    from paddleocr_vl_manga.data.lengths import image_tokens, sequence_lengths

    jsonl = data_dir / "train.jsonl"
    ds = OCRDataset(jsonl)
    lengths = sequence_lengths(ds, processor)
    i = max(range(len(lengths)), key=lambda k: (lengths[k], -k))
    rec = {k: v for k, v in ds.records[i].items() if k not in ("_line", "image_path")}
    fixed = lengths[i] - image_tokens(processor, rec["width"], rec["height"])  # prompt + answer + eos
    lo, hi = 1.0, 8.0  # scale factors: lo fits (the crop as it is), hi does not
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        w, h = round(rec["width"] * mid), round(rec["height"] * mid)
        lo, hi = (mid, hi) if fixed + image_tokens(processor, w, h) <= max_length else (lo, mid)
    w, h = round(rec["width"] * lo), round(rec["height"] * lo)
    with Image.open(ds.records[i]["image_path"]) as im:
        big = im.convert("RGB").resize((w, h), Image.BICUBIC)
    added = []
    for k in range(n):
        rel = f"crops/long_{k}.png"
        big.save(data_dir / rel)
        added.append(rec | {"id": f"{rec['id']}/long{k}", "image": rel, "width": w, "height": h,
                            "length": fixed + image_tokens(processor, w, h),
                            "image_tokens": image_tokens(processor, w, h) })
    with jsonl.open("a", encoding="utf-8") as f:
        for r in added:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("length", "image_tokens")},
                               ensure_ascii=False) + "\n")
    return added


def build(out: Path, mode: str) -> dict[str, Any]:
    """Build the suite's fixtures under out; returns their paths, sizes, the longest crop and seconds."""
    import paddleocr_vl_manga.data.manga109 as prep
    from tools.make_synthetic_manga109 import CHARSET, generate

    t = time.time()
    release, data = out / "release", out / "data"
    generate(release, **SIZES[mode], seed=0, num_workers=2, progress=False, extremes=True)
    prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data), num_workers=1,
                                   split_mode="random", test_fraction=0.0, val_fraction=0.0))
    tiny = None
    if mode == "smoke":
        from tools.make_tiny_model import build_tiny_model

        tiny = out / "tiny"
        build_tiny_model(tiny, charset=CHARSET)
    long = add_long_crops(data, processor_for(mode, tiny), LONG_CROPS)
    crops = sum(1 for _ in (data / "train.jsonl").open(encoding="utf-8"))
    return {"data_dir": str(data), "tiny_dir": str(tiny) if tiny else None, "crops": crops,
            "longest_crop": {k: long[0][k] for k in ("id", "width", "height", "length", "image_tokens")},
            "max_length": MAX_LENGTH, "seconds": round(time.time() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--smoke", action="store_true", help="smaller data and the tiny model")
    a = ap.parse_args(argv)
    print(json.dumps(build(Path(a.out_dir), "smoke" if a.smoke else "gpu"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
