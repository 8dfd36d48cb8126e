"""Confidence in the evaluation (issue 29): halves in metrics.json and summary.md, deciles and the kept-lines
curve in report.html, and a missing section (not a crash) for predictions written before confidence was."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
from paddleocr_vl_manga.evaluate.metrics import (
    cer_metrics,
    confidence_groups,
    edit_distance,
    kept_curve,
    normalize,
)
from paddleocr_vl_manga.evaluate.report import confidence_section


def rows_of(n: int, seed: int = 0) -> list[dict]:
    """Predictions whose confidence goes with their correctness, loosely (some ties on purpose)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ref = "".join(rng.choice("アイウエオカキクケコ") for _ in range(rng.randint(1, 6)))
        wrong = rng.random() < 0.5
        pred = ref[:-1] + "ン" if wrong else ref
        conf = round(rng.uniform(0.1, 0.7) if wrong else rng.uniform(0.4, 1.0), 1)
        stop = rng.choice(["cap", "loop"]) if wrong and rng.random() < 0.4 else "eos"
        rows.append({"id": f"c{i:03d}", "reference": ref, "prediction": pred, "stop": stop,
                     "confidence": conf, "edits": edit_distance(normalize(pred), normalize(ref))})
    return rows


@pytest.mark.parametrize("n", [2, 9, 40])
def test_halves_split_at_the_median_and_are_scored_apart(n: int) -> None:
    rows = rows_of(n)
    res = evaluate_model.confidence_halves(rows)
    ranked = sorted(rows, key=lambda r: (-r["confidence"], r["id"]))
    top, bottom = ranked[: (n + 1) // 2], ranked[(n + 1) // 2:]
    for half, name in ((top, "top_half"), (bottom, "bottom_half")):
        got, want = res[name], cer_metrics([r["prediction"] for r in half], [r["reference"] for r in half])
        assert got["n"] == len(half) and got["cer"] == pytest.approx(want["cer"])
        assert got["exact_match"] == pytest.approx(want["exact_match"])
        assert got["stops"] == {k: sum(r["stop"] == k for r in half) for k in ("eos", "cap", "loop")}
    assert res["top_half"]["confidence_min"] >= res["bottom_half"]["confidence_max"]


def test_deciles_hold_every_line_once_most_confident_first() -> None:
    rows = rows_of(37)
    groups = confidence_groups(rows, 10)
    assert sum(g["n"] for g in groups) == 37 and {g["n"] for g in groups} <= {3, 4}
    assert all(a["confidence_min"] >= b["confidence_max"] for a, b in zip(groups, groups[1:], strict=False))
    assert len(confidence_groups(rows[:4], 10)) == 4  # fewer lines than deciles: no empty group


def test_kept_curve_gives_the_cer_of_the_lines_at_or_above_each_threshold() -> None:
    rows = rows_of(50)
    points = kept_curve(rows)
    assert [t for _, _, t in points] == sorted({r["confidence"] for r in rows}, reverse=True)
    for share, cer, t in points:
        kept = [r for r in rows if r["confidence"] >= t]
        assert share == len(kept) / len(rows)
        assert cer == pytest.approx(cer_metrics([r["prediction"] for r in kept],
                                                [r["reference"] for r in kept])["cer"])
    assert points[-1][0] == 1.0


def test_report_section_has_a_decile_table_and_the_kept_curve() -> None:
    html = confidence_section(rows_of(40))
    assert html.count("<tr>") == 11 and html.count('<svg') == 1 and html.count("<circle") == 10
    assert "missing" not in html



def test_with_fewer_lines_than_deciles_each_row_names_the_decile_its_line_falls_in() -> None:
    import re

    # 5 lines: the least confident is in the bottom tenths; labelled 1..5 it read as the middle decile
    labels = [int(d) for d in re.findall(r"<tr><td>(\d+)</td>", confidence_section(rows_of(5)))]
    assert labels == [1 + 10 * i // 5 for i in range(5)]
    assert [int(d) for d in re.findall(r"<tr><td>(\d+)</td>", confidence_section(rows_of(40)))] == [
        *range(1, 11)]

@pytest.fixture(scope="module")
def run_dir(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("conf_eval")
    argv = ["--model_path", str(tiny_model), "--data_dir", str(data_dir), "--max_new_tokens", "6"]
    assert evaluate_model.main([*argv, "--output_dir", str(out)]) == 0
    return out, argv


def test_evaluation_writes_the_halves_to_metrics_and_summary(run_dir: tuple[Path, list]) -> None:
    out, _ = run_dir
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open(encoding="utf-8")]
    conf = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["confidence"]
    assert conf == json.loads(json.dumps(evaluate_model.confidence_halves(rows)))
    n = len(rows)
    assert (conf["top_half"]["n"], conf["bottom_half"]["n"]) == ((n + 1) // 2, n // 2) and n > 1
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "## By confidence" in summary
    assert f"| top half | {(n + 1) // 2} |" in summary and f"| bottom half | {n // 2} |" in summary
    html = (out / "report.html").read_text(encoding="utf-8")
    assert '<table class="deciles">' in html and 'class="kept"' in html


def test_predictions_without_confidence_say_the_section_is_missing(run_dir: tuple[Path, list],
                                                                   tmp_path: Path) -> None:
    """An evaluation continued from a predictions.jsonl written before confidence was stored."""
    out, argv = run_dir
    old = tmp_path / "old"
    shutil.copytree(out, old)
    rows = [json.loads(line) for line in (old / "predictions.jsonl").open(encoding="utf-8")]
    old_rows = [{k: v for k, v in r.items() if k not in ("confidence", "min_probability")} for r in rows]
    (old / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows), encoding="utf-8")
    assert evaluate_model.main([*argv, "--output_dir", str(old)]) == 0
    n = len(rows)
    conf = json.loads((old / "metrics.json").read_text(encoding="utf-8"))["confidence"]
    assert f"{n} of {n} predictions carry no confidence" in conf["missing"]
    assert f"Missing: {n} of {n} predictions" in (old / "summary.md").read_text(encoding="utf-8")
    html = (old / "report.html").read_text(encoding="utf-8")
    assert f"This section is missing: {n} of {n}" in html and "deciles" not in html
