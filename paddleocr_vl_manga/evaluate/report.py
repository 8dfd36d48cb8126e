"""report.html (one evaluation) and comparison.html (two), written by evaluate_model.py.

Each page is one self-contained file that opens from file:// with no network: crops are inlined as base64 PNG
data URIs, charts are inline SVG, styling is one <style> block, and there is no script. Character differences
come from evaluate.metrics.align (a minimum-edit alignment), under the `none` normalization like the headline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from paddleocr_vl_manga.data.dataset import open_rgb
from paddleocr_vl_manga.evaluate.metrics import (
    NORMALIZATIONS,
    STOPS,
    align,
    confidence_groups,
    confidence_missing,
    kept_curve,
    normalize,
)

THUMB = (360, 240)  # largest shown crop size; tall vertical lines are scaled to fit
CER_BINS = [(0.0, 0.0, "0 %"), (0.0, 0.1, "≤ 10 %"), (0.1, 0.25, "10–25 %"), (0.25, 0.5, "25–50 %"),
            (0.5, 1.0, "50–100 %"), (1.0, float("inf"), "> 100 %")]
LEGEND = ('Each prediction is marked against the reference: <span class="sub">substituted</span>, '
          '<span class="del">deleted</span> (reference characters missing from the prediction: struck out), '
          '<span class="ins">inserted</span> (in the prediction only).')
STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border: 1px solid #ccc; padding: 4px 10px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; }
figure.crop { margin: 0; padding: 8px; border: 1px solid #ccc; border-radius: 6px; background: #fafafa; }
figure.crop img { max-width: 100%; height: auto; display: block; margin: 0 auto 6px; background: #fff; }
.line { font-size: 18px; white-space: pre-wrap; word-break: break-all; margin: 2px 0; }
.tag { font-size: 12px; color: #666; display: inline-block; width: 5.5em; }
.sub { background: #ffd666; } .del { background: #ff9c9c; text-decoration: line-through; }
.ins { background: #9be59b; text-decoration: underline; } .meta { font-size: 12px; color: #555; }
h1, h2, .legend { overflow-wrap: anywhere; }
"""


def esc(text: str) -> str:
    return html.escape(text.replace("\n", "⏎")) or "∅"


def image_tag(path: str | None, alt: str) -> str:
    """The crop as an <img> with a PNG data URI (downscaled to THUMB; small crops are shown up to 2x)."""
    try:
        im = open_rgb(path or "")  # as the model read it: a 16-bit crop is not white, alpha not black
    except (OSError, ValueError):
        return '<p class="meta">(image not found)</p>'
    im.thumbnail(THUMB)
    scale = min(2.0, THUMB[0] / im.width, THUMB[1] / im.height)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img src="{uri}" alt="{esc(alt)}" width="{round(im.width * scale)}" '
            f'height="{round(im.height * scale)}">')


def diff_lines(ref: str, pred: str) -> tuple[str, str]:
    """Reference and prediction as HTML with the differences marked (.sub, .del, .ins).

    The reference marks what was substituted or deleted; the prediction line shows all three, a deletion as
    the missing reference characters struck through, so one line tells the whole story.
    """
    ref_html, pred_html = [], []
    for op, a, b in align(normalize(ref), normalize(pred)):
        if op == "equal":
            ref_html.append(esc(a))
            pred_html.append(esc(b))
            continue
        if op != "ins":
            ref_html.append(f'<span class="{op}">{esc(a)}</span>')
        pred_html.append(f'<span class="{op}">{esc(a if op == "del" else b)}</span>')
    return "".join(ref_html) or "∅", "".join(pred_html) or "∅"


def crop_cer(row: dict) -> float:
    return row["edits"] / max(len(normalize(row["reference"])), 1)


def crop_card(row: dict, preds: list[tuple[str, str]] | None = None) -> str:
    """One gallery item: the image, the reference and each prediction (label, text) marked against it."""
    img = image_tag(row.get("image"), row["id"])
    preds = preds or [("prediction", row["prediction"])]
    marked = [diff_lines(row["reference"], pred) for _, pred in preds]
    # With several predictions the reference stays plain: its marks would belong to one of them only.
    ref_html = marked[0][0] if len(preds) == 1 else esc(normalize(row["reference"]))
    lines = [f'<div class="line"><span class="tag">reference</span>{ref_html}</div>']
    for (label, _), (_, pred_html) in zip(preds, marked, strict=True):
        lines.append(f'<div class="line"><span class="tag">{esc(label)}</span>{pred_html}</div>')
    meta = f'{esc(row["id"])} · {esc(row.get("book", ""))} · {esc(row.get("orientation", ""))}'
    caption = f'<figcaption><div class="meta">{meta}</div>{"".join(lines)}</figcaption>'
    return f'<figure class="crop">{img}{caption}</figure>'


def bar_chart(title: str, bars: list[tuple[str, float, str]]) -> str:
    """Horizontal bars as inline SVG: (label, value, text printed after the bar)."""
    width, label_w, bar_w, row_h = 720, 150, 260, 24
    top = max((v for _, v, _ in bars), default=0) or 1
    height = 30 + row_h * len(bars)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="0" y="16" font-size="14" font-weight="bold">{esc(title)}</text>']
    for i, (label, value, note) in enumerate(bars):
        y = 26 + i * row_h
        w = bar_w * value / top
        parts += [f'<text x="{label_w - 6}" y="{y + 15}" font-size="12" text-anchor="end">'
                  f'{esc(label[:22])}</text>',
                  f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="#4c78a8"/>',
                  f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" font-size="12">{esc(note)}</text>']
    return "".join(parts) + "</svg>"


def pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def metrics_table(runs: list[tuple[str, dict]]) -> str:
    """One row per normalization; a column per metric, or per metric and run when there are several runs."""
    metrics = (("cer", "CER"), ("cer_mean", "mean CER"), ("exact_match", "exact match"))
    suffix = [f" ({label})" if len(runs) > 1 else "" for label, _ in runs]
    head = "".join(f"<th>{name}{html.escape(sfx)}</th>" for _, name in metrics for sfx in suffix)
    rows = [f"<tr><th>normalization</th>{head}</tr>"]
    for mode in NORMALIZATIONS:  # a metrics.json from before a normalization existed shows a dash there
        cells = "".join(f'<td class="num">{pct(m[mode][key])}</td>' if mode in m else "<td>–</td>"
                        for key, _ in metrics for _, m in runs)
        rows.append(f"<tr><td>{mode}</td>{cells}</tr>")
    return f'<table class="headline">{"".join(rows)}</table>'


def page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="ja"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(body)}</body></html>\n")


def group_bars(title: str, groups: dict[str, dict]) -> str:
    return bar_chart(title, [(g, m["none"]["cer"], f"CER {pct(m['none']['cer'])}, exact "
                              f"{pct(m['none']['exact_match'])}, {m['none']['n']} crops")
                             for g, m in groups.items()])


def cer_histogram(rows: list[dict]) -> str:
    counts = [sum(lo < crop_cer(r) <= hi if hi else crop_cer(r) == 0 for r in rows) for lo, hi, _ in CER_BINS]
    return bar_chart("CER per crop (normalization none)",
                     [(label, c, f"{c} crops") for (_, _, label), c in zip(CER_BINS, counts, strict=True)])


def conf(v: float) -> str:
    """A confidence with 3 significant digits: 0.997, and 0.00312 from an untrained model."""
    return f"{v:.3g}"


def kept_chart(points: list[tuple[float, float, float]]) -> str:
    """The lines kept by a confidence threshold against their CER, as an inline SVG line: x the share of
    lines kept (most confident first), y the CER of those lines. Each tenth of the lines is marked (hovering
    shows the threshold that keeps it and their CER); every other mark is labelled with its threshold."""
    width, height, left, top, plot_w, plot_h = 720, 300, 60, 30, 620, 220
    y_top = max((c for _, c, _ in points), default=0) or 1
    bottom = top + plot_h

    def xy(share: float, cer: float) -> tuple[float, float]:
        return left + plot_w * share, top + plot_h * (1 - cer / y_top)

    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, c) for s, c, _ in points))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'class="kept">',
             '<text x="0" y="16" font-size="14" font-weight="bold">CER of the lines kept by a confidence '
             'threshold</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>',
             f'<text x="{left - 6}" y="{top + 4}" font-size="11" text-anchor="end">{pct(y_top)}</text>',
             f'<text x="{left - 6}" y="{bottom}" font-size="11" text-anchor="end">0 %</text>',
             f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" text-anchor="middle">share of '
             'lines kept (most confident first)</text>',
             f'<polyline points="{path}" fill="none" stroke="#4c78a8" stroke-width="2"/>']
    for tick in range(0, 101, 20):
        parts.append(f'<text x="{left + plot_w * tick / 100:.1f}" y="{bottom + 14}" font-size="11" '
                     f'text-anchor="middle">{tick} %</text>')
    for tenth in range(1, 11):  # the first threshold keeping at least this share; every other one labelled
        share, cer, t = next(p for p in points if p[0] >= tenth / 10 - 1e-9)
        x, y = xy(share, cer)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#4c78a8"><title>confidence ≥ '
                     f'{conf(t)}: {pct(share)} of lines kept, CER {pct(cer)}</title></circle>')
        if tenth % 2 == 0:
            parts.append(f'<text x="{x:.1f}" y="{y - 7:.1f}" font-size="10" text-anchor="middle">'
                         f'≥{conf(t)}</text>')
    return "".join(parts) + "</svg>"


def confidence_section(rows: list[dict]) -> str:
    """CER and exact match by confidence decile (a table) and the kept-lines curve, so a user can pick a
    threshold; a note instead when the predictions carry no confidence."""
    why = confidence_missing(rows)
    head = "<h2>By confidence</h2>"
    if why:
        return f'{head}<p class="missing">This section is missing: {esc(why)}.</p>'
    cells = "".join(f"<th>{k}</th>" for k in ("decile", "confidence", "crops", "CER", "exact match", *STOPS))
    table = [f'<table class="deciles"><tr>{cells}</tr>']
    start = 0
    for g in confidence_groups(rows, 10):
        decile = start * 10 // len(rows) + 1  # under 10 lines some are empty: 5 lines are 1, 3, .., 9
        start += g["n"]
        nums = [g["n"], pct(g["cer"]), pct(g["exact_match"]), *(g["stops"][k] for k in STOPS)]
        table.append(f"<tr><td>{decile}</td><td>{conf(g['confidence_min'])}–{conf(g['confidence_max'])}</td>"
                     + "".join(f'<td class="num">{v}</td>' for v in nums) + "</tr>")
    return (f"{head}<p>Confidence is the geometric mean probability the model gave its own tokens. Decile 1 "
            "holds the most confident tenth of the lines; the curve shows what keeping only the lines above "
            "a threshold leaves, and how well those are read.</p>"
            f'{"".join(table)}</table>{kept_chart(kept_curve(rows))}')


def stops_paragraph(res: dict) -> str:
    """How many answers did not end by themselves (cut by their token cap, or stopped looping), and how
    many are empty (each scores CER 100 %: a model that answers nothing can pass for a low CER)."""
    stops, n = res.get("stops"), max(res["num_samples"], 1)
    text = ""
    if stops:
        cap, loop = stops["cap"], stops["loop"]
        text = (f"<p>Generation ended by the model on {stops['eos']} crops; {cap} ({pct(cap / n)}) hit their "
                f"token cap and {loop} ({pct(loop / n)}) were stopped looping (repeats cut): those answers "
                "are cut short.</p>")
    empty = res.get("empty_answers")
    if empty:
        text += (f'<p class="empty"><b>{empty} answers ({pct(empty / n)}) are empty</b>; each counts as CER '
                 "100 %, lower than a wrong long answer scores.</p>")
    return text


def write_report(res: dict, rows: list[dict], path: str | Path) -> None:
    """report.html of one evaluate_model.py run: headline table, charts, gallery of the worst crops."""
    m = res["metrics"]["none"]
    body = [f"<p>{res['num_samples']} of {res['split_size']} crops from "
            f"<code>{esc(res['data_file'])}</code>; {esc(res['device'])}, {res['seconds']:.1f} s "
            f"({res['crops_per_second']:.2f} crops/s).</p>",
            f"<p><b>CER {pct(m['cer'])}, exact match {pct(m['exact_match'])}</b> (normalization none, "
            "the headline).</p>", stops_paragraph(res), "<h2>Every normalization</h2>",
            metrics_table([("value", res["metrics"])]),
            '<h2>Breakdowns</h2><div class="charts">', group_bars("CER by book", res["by_book"]),
            group_bars("CER by orientation", res["by_orientation"]), cer_histogram(rows), "</div>",
            confidence_section(rows),
            f"<h2>Worst {len(res['worst'])} crops (most edits)</h2>",
            f"<p class=\"meta\">{LEGEND}</p>",
            '<section class="gallery" id="gallery">', *map(crop_card, res["worst"]), "</section>"]
    Path(path).write_text(page(f"{res['model_path']} on {res['split']}", body), encoding="utf-8")


def write_comparison(first: tuple[str, dict, list[dict]], second: tuple[str, dict, list[dict]],
                     path: str | Path, limit: int = 20) -> dict[str, int]:
    """comparison.html of two runs: both headline tables, then the crops the second fixed and broke.

    fixed: the first run's prediction was wrong (normalization none) and the second's is exact; broken: the
    reverse. Only crops both runs evaluated are compared. Returns the counts shown on the page.
    """
    (la, ra, rows_a), (lb, rb, rows_b) = first, second
    by_id = {r["id"]: r for r in rows_a}
    pairs = [(by_id[r["id"]], r) for r in rows_b if r["id"] in by_id]
    fixed = sorted((p for p in pairs if p[0]["edits"] and not p[1]["edits"]), key=lambda p: -p[0]["edits"])
    broken = sorted((p for p in pairs if not p[0]["edits"] and p[1]["edits"]), key=lambda p: -p[1]["edits"])
    counts = {"common": len(pairs), "fixed": len(fixed), "broken": len(broken),
              "better": sum(b["edits"] < a["edits"] for a, b in pairs),
              "worse": sum(b["edits"] > a["edits"] for a, b in pairs)}

    def cards(items: list[tuple[dict, dict]]) -> list[str]:
        return [crop_card(b, [("A", a["prediction"]), ("B", b["prediction"])]) for a, b in items[:limit]]

    # Columns, tags and headings name the runs A and B; their model paths (often 80+ characters, which
    # pushed the headline table past a 1400 px window) are spelled out once, in the legend, wrapped.
    legend = ('<p class="legend">' + "<br>".join(f"<b>{short}</b> = <code>{esc(label)}</code>"
                                                 for short, label in (("A", la), ("B", lb))) + "</p>")
    empties = [f'<p class="empty">{esc(label)}: <b>{r["empty_answers"]} empty answers '
               f'({pct(r["empty_answers"] / max(r["num_samples"], 1))})</b>, each CER 100 %: a lower CER '
               "with many empty answers is no plain win.</p>"
               for label, r in (("A", ra), ("B", rb)) if r.get("empty_answers")]
    body = [metrics_table([("A", ra["metrics"]), ("B", rb["metrics"])]), legend, *empties,
            f"<p>{counts['common']} crops in both runs ({len(rows_a)} and {len(rows_b)} evaluated): "
            f"<b>{counts['fixed']} fixed</b>, <b>{counts['broken']} broken</b> by the second (B); "
            f"{counts['better']} with fewer edits, {counts['worse']} with more.</p>",
            f"<p class=\"meta\">{LEGEND}</p>",
            f"<h2>Fixed by B ({min(len(fixed), limit)} of {len(fixed)} shown)</h2>",
            '<section class="gallery" id="fixed">', *cards(fixed), "</section>",
            f"<h2>Broken by B ({min(len(broken), limit)} of {len(broken)} shown)</h2>",
            '<section class="gallery" id="broken">', *cards(broken), "</section>"]
    Path(path).write_text(page(f"{la} vs {lb}", body), encoding="utf-8")
    return counts
