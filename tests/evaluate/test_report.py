"""report.html and comparison.html: content, self-containment, and a real render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
from html import escape
from pathlib import Path

import pytest
from PIL import Image, ImageStat

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
from paddleocr_vl_manga.data.dataset import read_jsonl
from paddleocr_vl_manga.evaluate.metrics import NORMALIZATIONS, all_metrics, edit_distance, normalize
from paddleocr_vl_manga.evaluate.report import diff_lines
from tools.write_docs import chromium, chromium_binary  # one owner of the headless-Chromium flags

WORST = 4


@pytest.fixture(scope="module")
def report_dir(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert evaluate_model.main(["--model_path", str(tiny_model), "--data_dir", str(data_dir), "--output_dir",
                                str(out), "--max_new_tokens", "6", "--worst", str(WORST)]) == 0
    return out


def figures(html: str, section: str) -> list[str]:
    """The <figure> items of one gallery section, in page order."""
    part = re.search(rf'<section class="gallery" id="{section}">(.*?)</section>', html, re.S)
    assert part, f"no gallery section {section!r}"
    return re.findall(r'<figure class="crop">.*?</figure>', part.group(1), re.S)


def test_diff_marks_each_kind_of_edit() -> None:
    # ref "abcdef" vs pred "aXcdf!": b->X substituted, e deleted, ! inserted
    ref, pred = diff_lines("abcdef", "aXcdf!")
    assert ref == 'a<span class="sub">b</span>cd<span class="del">e</span>f'
    assert pred == 'a<span class="sub">X</span>cd<span class="del">e</span>f<span class="ins">!</span>'
    deleted = '<span class="del">&lt;&amp;&gt;</span>'  # escaped; a deletion shows on both lines
    assert diff_lines("<&>", "") == (deleted, deleted) and diff_lines("", "") == ("∅", "∅")


def test_report_is_self_contained(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    m = json.loads((report_dir / "metrics.json").read_text(encoding="utf-8"))
    for mode in NORMALIZATIONS:  # the headline table: one row per normalization, its CER in the row
        cer = f"{100 * m['metrics'][mode]['cer']:.2f} %"
        assert f'<tr><td>{mode}</td><td class="num">{cer}</td>' in html
    # per-book and per-orientation charts, CER distribution, lines kept by a confidence threshold
    assert html.count("<svg") == 4
    for book in m["by_book"]:
        assert f">{book}</text>" in html
    # Nothing is fetched: every src/href is a data: URI (the SVG xmlns is a name, not a request).
    assert not re.findall(r'(?:src|href)="(?!data:)', html) and "<script" not in html and "<link" not in html

    cards = figures(html, "gallery")
    assert len(cards) == WORST == len(m["worst"])
    rows = {json.loads(line)["id"]: json.loads(line) for line in (report_dir / "predictions.jsonl").open()}
    for card, worst in zip(cards, m["worst"], strict=True):
        assert worst["id"] in card
        uri = re.search(r'<img src="data:image/png;base64,([^"]+)"', card).group(1)
        crop = rows[worst["id"]]["image"]
        with Image.open(io.BytesIO(base64.b64decode(uri))) as thumb, Image.open(crop) as im:
            assert abs(thumb.width / thumb.height - im.width / im.height) < 0.1  # the crop, not a placeholder
        ref_html, pred_html = diff_lines(worst["reference"], worst["prediction"])
        assert ref_html in card and pred_html in card


def _run(folder: Path, model: str, rows: list[dict]) -> str:
    """A run folder as evaluate_model.py writes it (metrics.json + predictions.jsonl)."""
    folder.mkdir()
    for r in rows:
        r["edits"] = edit_distance(normalize(r["prediction"]), normalize(r["reference"]))
    metrics = all_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    res = {"model_path": model, "split": "test", "num_samples": len(rows), "seed": 42, "data_file": "d",
           "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(res, ensure_ascii=False), encoding="utf-8")
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    return str(folder / "metrics.json")


def test_comparison_page_shows_fixed_and_broken(data_dir: Path, tmp_path: Path) -> None:
    recs = read_jsonl(data_dir / "test.jsonl")[:6]
    assert len(recs) == 6

    def rows(preds: list[str | None]) -> list[dict]:  # None: read exactly; else the text plus these edits
        return [{"id": r["id"], "image": r["image_path"], "book": r["book"], "orientation": r["orientation"],
                 "reference": r["text"], "prediction": r["text"] + (p or "")}
                for r, p in zip(recs, preds, strict=True)]

    # crop:            0       1        2      3     4      5   (the edit counts do not depend on the texts)
    a = _run(tmp_path / "a", "base", rows([None, "xxxx", "y", None, None, "z"]))
    b = _run(tmp_path / "b", "ft", rows(["qqq", None, None, None, "w", "v"]))
    out = tmp_path / "cmp"
    assert evaluate_model.main(["--compare", a, b, "--output_dir", str(out), "--worst", "5"]) == 0
    html = (out / "comparison.html").read_text(encoding="utf-8")
    fixed, broken = figures(html, "fixed"), figures(html, "broken")
    # fixed: wrong in the first run, exact in the second, most edits (in the first) first; broken: the reverse
    assert len(fixed) == 2 and recs[1]["id"] in fixed[0] and recs[2]["id"] in fixed[1]
    assert len(broken) == 2 and recs[0]["id"] in broken[0] and recs[4]["id"] in broken[1]
    assert "<b>2 fixed</b>, <b>2 broken</b>" in html
    assert html.count("<img src=\"data:image/png;base64,") == 4
    assert 'class="sub">qqq' in broken[0] or 'class="ins">' in broken[0]  # the second run's error is marked
    assert f'<span class="tag">reference</span>{escape(recs[0]["text"].strip())}</div>' in broken[0]
    for mode in NORMALIZATIONS:
        assert f"<tr><td>{mode}</td>" in html
    assert evaluate_model.main(["--compare", a, b, "--output_dir", str(out), "--worst", "1"]) == 0
    html = (out / "comparison.html").read_text(encoding="utf-8")
    assert len(figures(html, "fixed")) == len(figures(html, "broken")) == 1 and "1 of 2 shown" in html


@pytest.mark.skipif(chromium_binary() is None,
                    reason="no Chromium on this machine (.ci/run installs Debian's chromium when it can)")
def test_report_renders_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    url = (report_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,1600", url, cwd=tmp_path)
    with Image.open(shot) as im:
        gray = im.convert("L")
        assert gray.size == (1200, 1600)
        # A blank (or error) page is one flat colour; the report has text, bars and crops.
        assert ImageStat.Stat(gray).stddev[0] > 20, ImageStat.Stat(gray).stddev
        assert sum(gray.histogram()[:128]) > 0.01 * gray.width * gray.height  # >1 % dark pixels

    dom = chromium("--dump-dom", url, cwd=tmp_path).stdout
    cards = figures(dom, "gallery")
    assert len(cards) == WORST and all('<img src="data:image/png;base64,' in c for c in cards)
    assert all(f"<td>{mode}</td>" in dom for mode in NORMALIZATIONS)


RUNS = "/home/reader/models/paddleocr-vl-manga/runs"
LONG_PATHS = (f"{RUNS}/2026-12-06-lora-r16-alpha32-lr2e-4/checkpoint-2000",
              f"{RUNS}/2026-12-06-full-finetune-lr1e-5-epochs3/checkpoint-6000")
WIDTH_PROBE = ("<script>const t = document.querySelector('table.headline').getBoundingClientRect();"
               "document.body.dataset.widths = [Math.ceil(t.right), window.innerWidth,"
               " document.documentElement.scrollWidth].join(',');</script></body>")


@pytest.mark.skipif(chromium_binary() is None,
                    reason="no Chromium on this machine (.ci/run installs Debian's chromium when it can)")
def test_comparison_table_fits_a_1400_px_window_with_long_model_paths(data_dir: Path, tmp_path: Path) -> None:
    recs = read_jsonl(data_dir / "test.jsonl")[:4]
    runs = [_run(tmp_path / name, model, [
        {"id": r["id"], "image": r["image_path"], "book": r["book"], "orientation": r["orientation"],
         "reference": r["text"], "prediction": r["text"] + suffix[i]} for i, r in enumerate(recs)])
        for name, model, suffix in (("a", LONG_PATHS[0], ["x", "", "y", ""]),
                                    ("b", LONG_PATHS[1], ["", "z", "", ""]))]
    out = tmp_path / "cmp"
    assert evaluate_model.main(["--compare", *runs, "--output_dir", str(out)]) == 0
    html = (out / "comparison.html").read_text(encoding="utf-8")
    assert all(escape(p) in html for p in LONG_PATHS)  # the legend still names each model in full
    # The page has no script of its own; a copy with a probe reports the rendered widths in the DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", WIDTH_PROBE), encoding="utf-8")
    dom = chromium("--window-size=1400,900", "--dump-dom", probe.resolve().as_uri(), cwd=tmp_path).stdout
    widths = re.search(r'data-widths="([\d,]+)"', dom).group(1)
    table_right, viewport, page_width = map(int, widths.split(","))
    assert viewport == 1400
    assert table_right <= viewport and page_width <= viewport, (table_right, page_width)
