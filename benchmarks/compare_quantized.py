"""Accuracy of int8 against fp32 on a trained model: CER of each on a split, and the share of identical texts.

    python benchmarks/compare_quantized.py --model_path demo_output/sft_output --data_dir demo_output/data

The crops are read as evaluate_model.py reads them (every crop of the split, generate_texts, CER over
unnormalized texts: metrics "none"); the model is loaded once in fp32, then quantized in place by each
--methods entry in turn (int8-text before int8: int8 only adds the vision side), so every method sees the
same weights. The issue's bar: CER within 1 percentage point of fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paddleocr_vl_manga.data.dataset import OCRDataset, load_image  # noqa: E402
from paddleocr_vl_manga.evaluate.metrics import cer_metrics  # noqa: E402
from paddleocr_vl_manga.model.generation import generate_texts  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from paddleocr_vl_manga.model.quantize import METHODS, quantize_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--methods", nargs="+", default=["int8-text", "int8"], choices=METHODS)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    source = str(Path(a.data_dir) / f"{a.split}.jsonl")
    records = OCRDataset(source).records
    images = [load_image(r, source) for r in records]
    refs = [r["text"] for r in records]
    model, processor = load_model_and_processor(a.model_path, dtype=torch.float32, device="cpu")

    def run(label: str) -> list[str]:
        t = time.perf_counter()
        texts = generate_texts(model, processor, images, batch_size=a.batch_size,
                               max_new_tokens=a.max_new_tokens)
        seconds[label] = time.perf_counter() - t
        return texts

    seconds: dict[str, float] = {}
    preds = {"fp32": run("fp32")}
    for method in a.methods:
        quantize_model(model, method)
        preds[method] = run(method)

    n = len(records)
    res: dict[str, dict] = {}
    print(f"{a.model_path} on {source}: {n} crops, batch {a.batch_size}, {a.threads} threads")
    print(f"{'method':10s} {'CER':>7s} {'vs fp32':>8s} {'exact':>6s} {'identical to fp32':>18s} "
          f"{'seconds':>8s}")
    for label, texts in preds.items():
        m = cer_metrics(texts, refs)
        same = sum(x == y for x, y in zip(texts, preds["fp32"], strict=True))
        res[label] = {"cer": m["cer"], "exact_match": m["exact_match"], "identical": same, "n": n,
                      "seconds": seconds[label]}
        delta = 100 * (m["cer"] - res["fp32"]["cer"])
        print(f"{label:10s} {m['cer']:7.2%} {delta:+7.2f}pp {m['exact_match']:6.1%} "
              f"{same:>8d}/{n} ({same / n:5.1%}) {seconds[label]:8.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
