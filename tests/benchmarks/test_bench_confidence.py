"""benchmarks/bench_confidence.py on the tiny model: both variants timed side by side, the same texts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_confidence  # noqa: E402

import paddleocr_vl_manga.model.generation as generation  # noqa: E402


def test_tiny_run_prints_both_variants_their_ratio_and_the_load(capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    try:
        rc = bench_confidence.main(["--model", "tiny", "--num_samples", "2", "--max_new_tokens", "3",
                                    "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main() sets the process-wide thread count
    out = capsys.readouterr().out
    assert rc == 0 and "load average" in out
    assert generation.TokenProbabilities is bench_confidence.MEASURED  # put back after the run
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [r[2] for r in rows] == ["1", "2"]  # batch 1, then one batch of both crops
    for r in rows:
        with_s, noop_s, ratio = float(r[4]), float(r[5]), r[6]
        assert with_s > 0 and noop_s > 0 and ratio.endswith("x")
        assert float(ratio[:-1]) == pytest.approx(with_s / noop_s, rel=0.01)  # printed rounded to ms
        assert float(r[8]) > 0 and r[9].endswith("%")  # the processor timed alone, its share of the no-op
        assert r[11] == "yes"  # the no-op processor changes no text
        low, high = map(float, r[12].split("-"))
        assert 0 < low <= high <= 1  # the measured variant's confidences
