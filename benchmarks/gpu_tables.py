"""Rewrite README's GPU tables from benchmarks/gpu_suite.sh's results.json, so no figure is typed by hand.

    python benchmarks/gpu_tables.py gpu/results.json                  # docs/benchmarks.md, in place
    python benchmarks/gpu_tables.py gpu/results.json --readme X.md    # another file

Each table sits between a pair of marker comments; what is between them is replaced, the rest of the file is
kept byte for byte, and a second run with the same JSON changes nothing:

    <!-- gpu-table:train --> ... <!-- /gpu-table:train -->
    <!-- gpu-table:eval --> ... <!-- /gpu-table:eval -->

A --smoke results.json (tiny model on CPU) is refused unless --allow_smoke (the tests use it on a copy): its
figures say the suite works, not what a GPU does. It also prints the recipes train.sh's defaults should come
from (the fastest that ran under the 12 GB card's cap, and the fastest overall), and for the first, by
the memory plan, the batch at which it holds the suite's longest crop under that cap. gpu_suite.py renders
results.md with the same functions; only that plan imports torch (a meta-device model: no memory).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- {}gpu-table:{} -->"
NONE = "–"


def gpu_name(device: str | None) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' -> 'NVIDIA H100 80GB HBM3'; 'cpu (x86_64, 1 threads)' -> 'CPU (...)'."""
    if not device:
        return NONE
    m = re.fullmatch(r"cuda(?::\d+)? \((.*)\)", device)
    return m.group(1) if m else device.replace("cpu", "CPU", 1)


def num(x: float | None, spec: str, suffix: str = "") -> str:
    return NONE if x is None else f"{x:{spec}}{suffix}"


def _parts(results: dict, kind: str) -> list[dict]:
    return [p for p in results.get("parts", []) if p.get("kind") == kind]


def train_rows(results: dict) -> list[dict[str, Any]]:
    """Every recipe the suite planned, in order: its bench_train row, or a placeholder saying why none."""
    out = []
    for part in _parts(results, "train"):
        rows = {r["recipe"]: r for r in part.get("rows") or []}  # None: killed before its first row
        for recipe in part.get("recipes", []):
            row = rows.get(recipe) or {"recipe": recipe, "status": f"not run: part {part['status']}"}
            out.append(row | {"part": part["name"], "memory_cap_gb": part.get("memory_cap_gb")})
    return out


def seed_row(results: dict) -> dict | None:
    return next((r for r in train_rows(results) if r["recipe"] == "seed" and r["status"] == "ok"), None)


def row_status(r: dict) -> str:
    steps, timed = r.get("steps"), r.get("timed_steps")
    if r["status"] == "ok" and steps and timed is not None and timed < steps:
        return f"ok, {timed}/{steps} steps (time budget)"
    return r["status"]


def train_table(results: dict) -> str:
    seed = seed_row(results)
    lines = ["| GPU | recipe | memory cap | B×A | ckpt | samples/s | tokens/s | peak GiB | MFU | vs seed "
             "| loss check | status |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in train_rows(results):
        ok = r["status"] == "ok"  # a row that OOMed or was skipped has no rates
        cap, check = r["memory_cap_gb"], r.get("check")
        cap_cell = NONE if cap is None else f"{cap:g} GiB"
        if cap is not None and r.get("device", "").startswith("cpu"):
            cap_cell += " (n/a on CPU)"
        ratio = r["samples_per_s"] / seed["samples_per_s"] if ok and seed else None
        mfu = 100 * r["mfu"] if ok and r.get("mfu") is not None else None
        cells = [
            gpu_name(r.get("device")), f"`{r['recipe']}`", cap_cell,
            r.get("bxa", NONE).replace("x", "×"), NONE if "gc" not in r else ("on" if r["gc"] else "off"),
            num(r.get("samples_per_s") if ok else None, ".2f"),
            num(r.get("tokens_per_s") if ok else None, ".0f"), num(r.get("peak_gib"), ".2f"),
            num(mfu, ".1f", " %"), num(ratio, ".2f", "×"),
            NONE if check is None else ("OK" if check["ok"] else "**MISMATCH**"), row_status(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_table(results: dict) -> str:
    lines = ["| GPU | path | crops | seconds | crops/s | vs seed loop | identical texts | peak GiB |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for part in _parts(results, "eval"):
        e = part.get("result")
        if not e:
            lines.append(f"| {NONE} | `{part['name']}` | | | | | | not run: part {part['status']} |")
            continue
        gpu, seed, batched = gpu_name(e["device"]), e["seed_loop"], e["batched"]
        cut = "" if seed["crops"] == e["crops"] else f" (time budget: {seed['crops']} of {e['crops']} crops)"
        lines += [
            f"| {gpu} | seed loop (batch 1, no KV cache){cut} | {seed['crops']} | {seed['seconds']:.2f} "
            f"| {seed['crops_per_s']:.2f} | 1.00× | | |",  # one peak for the whole run: on the next row
            f"| {gpu} | `generate_texts` (batch {e['batch_size']}, KV cache) | {batched['crops']} "
            f"| {batched['seconds']:.2f} | {batched['crops_per_s']:.2f} | {e['ratio']:.2f}× "
            f"| {e['identical']}/{e['compared']} | {num(e.get('peak_gib'), '.2f')} |",
        ]
    return "\n".join(lines)


def rope_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(rope ids from the collator, from the model) for every measured recipe whose rope=0 twin (the same
    settings and memory cap otherwise) was measured too. Rows are bench_train's (or train_rows')."""
    ok = [r for r in rows if r.get("status") == "ok" and "settings" in r]

    def key(r: dict) -> str:
        settings = {k: v for k, v in r["settings"].items() if k not in ("name", "rope")}
        return json.dumps([settings, r.get("memory_cap_gb")], sort_keys=True)

    pairs = []
    for off in (r for r in ok if r["settings"].get("rope") is False):
        on = next((r for r in ok if r["settings"].get("rope", True) and key(r) == key(off)), None)
        if on is not None:
            pairs.append((on, off))
    return pairs


def rope_table(results: dict) -> str:
    """Training with the rope position ids from the collator (loader workers) vs from the model's forward."""
    pairs = rope_pairs(train_rows(results))
    if not pairs:
        return "No recipe was measured both with and without the collator's rope position ids."
    lines = ["| GPU | memory cap | ids from the collator | samples/s | ids from the model | samples/s "
             "| collator ÷ model |", "|---|---|---|---:|---|---:|---:|"]
    for on, off in pairs:
        cap = on["memory_cap_gb"]
        lines.append(f"| {gpu_name(on.get('device'))} | {NONE if cap is None else f'{cap:g} GiB'} "
                     f"| `{on['recipe']}` | {on['samples_per_s']:.2f} | `{off['recipe']}` "
                     f"| {off['samples_per_s']:.2f} | {on['samples_per_s'] / off['samples_per_s']:.2f}× |")
    return "\n".join(lines)


def provenance(results: dict) -> str:
    s = results["suite"]
    v = s.get("versions", {})
    return (f"{gpu_name(s.get('device'))}, {s['started_utc'][:10]}: `bash benchmarks/gpu_suite.sh"
            f"{' --smoke' if s['mode'] == 'smoke' else ''}` ({s['config']} model, random weights; torch "
            f"{v.get('torch')}, transformers {v.get('transformers')}; {s['elapsed_s']:.0f} s of its "
            f"{s['budget_s']:.0f} s budget), copied by `benchmarks/gpu_tables.py` from its results.json.")


@cache
def _planned_gib(precision: str, batch_size: int, seq_len: int, image_tokens: int, gc: bool) -> float:
    """the memory plan's total for the full-size model (weights, gradients, optimizer, activations), GiB."""
    from transformers import PaddleOCRVLConfig

    sys.path.insert(0, str(ROOT))
    from paddleocr_vl_manga.train.memory_plan import GIB, memory_plan

    config = PaddleOCRVLConfig(text_config={"tie_word_embeddings": False}, tie_word_embeddings=False)
    rows = memory_plan(config, batch_size=batch_size, seq_len=seq_len, image_tokens=image_tokens,
                       gradient_checkpointing=gc, bf16_autocast=True, lora_r=0, lora_targets="language",
                       lora_precision=precision)
    return next(r for r in rows if r.mode == precision).total / GIB


def longest_crop_plan(results: dict, row: dict) -> str:
    """Whether `row`'s recipe holds the suite's longest crop under its cap by the memory plan (every row of a
    batch padded to it), else the largest batch that does. Full-size runs only (the plan is the 0.9B's)."""
    crop = (results["suite"].get("fixtures") or {}).get("longest_crop")
    settings, cap = row.get("settings") or {}, row.get("memory_cap_gb")
    if not crop or results["suite"].get("config") != "full" or not cap or "bs" not in settings:
        return ""

    def gib(b: int) -> float:
        return _planned_gib(settings["precision"], b, crop["length"], crop["image_tokens"], settings["gc"])

    bs = settings["bs"]
    fit = next((b for b in range(bs, 0, -1) if gib(b) <= cap), None)
    head = f"; the longest crop ({crop['length']} tokens) by the memory plan: {gib(bs):.2f} GiB at batch {bs}"
    if fit == bs:
        return f"{head}, fits {cap:g} GiB"
    if fit:
        return (f"{head}, over {cap:g} GiB: fits at batch {fit} ({gib(fit):.2f} GiB; BATCH_SIZE={fit} "
                f"GRAD_ACCUM={max(1, bs * settings.get('ga', 1) // fit)})")
    return f"{head}; not even batch 1 fits {cap:g} GiB ({gib(1):.2f})"


def choice(results: dict) -> list[str]:
    """train.sh's candidates: our full fine-tune (not seed, lowres or LoRA), loss checked; fastest wins."""
    rows = [r for r in train_rows(results) if r["status"] == "ok" and r.get("check", {"ok": True})["ok"]
            and r.get("settings", {}).get("precision") in ("bf16_lean", "fp32_master")
            and not r["settings"].get("min_pixels") and not r["settings"].get("lora_r")]
    if not rows:
        return ["no recipe of ours was measured: no choice for train.sh"]
    fits = [r for r in rows if r["memory_cap_gb"] is not None and r["memory_cap_gb"] <= 12]
    lines = []
    if fits:
        r = max(fits, key=lambda r: r["samples_per_s"])
        lines.append(f"cards under 20 GB: `{r['recipe']}` ({r['samples_per_s']:.2f} samples/s under the "
                     f"{r['memory_cap_gb']:g} GiB cap, peak {num(r.get('peak_gib'), '.2f')} GiB"
                     f"{longest_crop_plan(results, r)})")
    else:
        lines.append("cards under 20 GB: none of ours ran under the 12 GB card's cap")
    r = max(rows, key=lambda r: r["samples_per_s"])
    lines.append(f"cards of 20 GB and more: `{r['recipe']}` ({r['samples_per_s']:.2f} samples/s, peak "
                 f"{num(r.get('peak_gib'), '.2f')} GiB, reserved {num(r.get('reserved_gib'), '.2f')} GiB)")
    return lines


def readme_blocks(results: dict) -> dict[str, str]:
    note = provenance(results)
    return {"train": f"{train_table(results)}\n\n{note}", "eval": f"{eval_table(results)}\n\n{note}"}


def render_markdown(results: dict) -> str:
    """results.md: both tables, what each part did, unmet needs, and the train.sh choice."""
    s = results["suite"]
    out = [f"# GPU suite ({s['mode']}): {gpu_name(s.get('device'))}", "", provenance(results), ""]
    if s.get("gpu"):
        out += [f"nvidia-smi: {s['gpu']}", ""]
    if s.get("status") != "ok":
        out += [f"**Suite: {s.get('status')}**", ""]
    notes = [f"unmet: {w}" for w in s.get("unmet", [])] + s.get("warnings", [])  # warnings: older runs
    if fx := s.get("fixtures"):
        crop = fx["longest_crop"]
        notes.append(f"data: {fx['crops']} crops built once for every part, the longest {crop['length']} "
                     f"tokens ({crop['width']}×{crop['height']} px, {crop['image_tokens']} image tokens; "
                     f"max_length {fx['max_length']})")
    if st := s.get("stages_s"):
        notes.append("seconds per stage: " + ", ".join(f"{k} {num(v, '.0f')}" for k, v in st.items()))
    out += [f"- {w}" for w in notes] + ([""] if notes else [])
    out += ["## Training (`benchmarks/bench_train.py`)", "", train_table(results), "",
            "### Rope position ids: from the collator vs from the model", "", rope_table(results), "",
            "## Evaluation (`benchmarks/bench_eval.py`)", "", eval_table(results), "",
            "## Parts", "", "| part | status | seconds | slot s | command |", "|---|---|---:|---:|---|"]
    for p in results.get("parts", []):
        out.append(f"| {p['name']} | {p['status']} | {num(p.get('seconds'), '.0f')} "
                   f"| {num(p.get('slot_s'), '.0f')} | `{p.get('command', NONE)}` |")
    out += ["", "## train.sh defaults from these figures", ""] + [f"- {line}" for line in choice(results)]
    return "\n".join(out) + "\n"


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace what lies between each pair of markers; ValueError when a pair is missing or repeated."""
    for name, body in blocks.items():
        start, end = MARKER.format("", name), MARKER.format("/", name)
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise ValueError(f"README needs exactly one {start} ... {end} pair, in that order")
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json written by benchmarks/gpu_suite.sh")
    ap.add_argument("--readme", default=str(ROOT / "docs" / "benchmarks.md"), help="the page with the tables")
    ap.add_argument("--allow_smoke", action="store_true", help="accept a --smoke run (tests)")
    a = ap.parse_args(argv)
    try:
        results = json.loads(Path(a.results).read_text(encoding="utf-8"))
        if results["suite"]["mode"] == "smoke" and not a.allow_smoke:
            raise ValueError(f"{a.results} is a --smoke run (tiny model on CPU), not GPU figures")
        readme = Path(a.readme)
        old = readme.read_text(encoding="utf-8")
        new = replace_blocks(old, readme_blocks(results))
    except (OSError, ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new != old:
        readme.write_text(new, encoding="utf-8")
    print(f"{readme}: {'tables rewritten' if new != old else 'already up to date'}")
    print("train.sh defaults from these figures:\n" + "\n".join(f"  {line}" for line in choice(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
