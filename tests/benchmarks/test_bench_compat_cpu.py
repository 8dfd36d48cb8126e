"""benchmarks/bench_compat_cpu.py in tiny mode: manga-ocr's architecture and ours side by side, split."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_compat_cpu  # noqa: E402


def test_tiny_run_prints_every_row_split_and_ratio(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:  # one thread: the test stays fast on a loaded 2-core machine
        rc = bench_compat_cpu.main(
            ["--model", "tiny", "--num_samples", "2", "--max_new_tokens", "3", "--threads", "1",
             "--min_pixels", "12544", "784", "--batch_size", "2"],
            variants=(bench_compat_cpu.FP32, bench_compat_cpu.Variant("copy", copy.deepcopy)),
        )
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    out = capsys.readouterr().out
    assert rc == 0
    assert "crops: 2 " in out and "threads: 1," in out
    single, batched = out.split("batch 1, one call per crop", 1)[1].split("mocr.batch(crops), batch 2", 1)
    rows = {line[:52].strip(): line[52:].split() for line in single.splitlines()[2:] if line.strip()}
    budgets = ("release budget (min_pixels 12,544)", "min_pixels 784")
    expected = ["manga-ocr arch, greedy", "manga-ocr arch, 4 beams",
                *(f"ours {v}, {b}" for v in ("fp32", "copy") for b in budgets)]
    assert list(rows) == expected
    for label, cols in rows.items():
        # img tok, tokens, s/crop, vision, prefill, decode, other, median, /greedy, /4 beams, load avg
        tokens, per_crop, *parts, median = (float(c) for c in cols[1:8])
        assert tokens == 3.0, label  # exactly --max_new_tokens decoder forwards, though weights are random
        assert per_crop > 0 and median > 0 and min(parts) >= 0, label  # vision ... other (rounded to ms)
        assert cols[8].endswith("x") and cols[9].endswith("x"), label
    assert rows["manga-ocr arch, greedy"][0] == "197"  # ViT/16 at 224 x 224: 196 patches and [CLS]
    assert rows["manga-ocr arch, greedy"][8] == "1.00x" and rows["manga-ocr arch, 4 beams"][9] == "1.00x"
    assert int(rows[f"ours fp32, {budgets[0]}"][0]) > int(rows[f"ours fp32, {budgets[1]}"][0])
    batch_rows = [line for line in batched.splitlines()[2:] if line.startswith("ours ")]
    assert len(batch_rows) == 4 and all(line.endswith("2/2") for line in batch_rows)
    assert "warning" not in out


def test_physical_cores_within_the_affinity_mask() -> None:
    cores = bench_compat_cpu.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
