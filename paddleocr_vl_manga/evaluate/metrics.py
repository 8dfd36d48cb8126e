"""OCR metrics shared by training-time evaluation, evaluate_model.py and the benchmarks.

Two published protocols disagree on the same model (9 % vs 27 % exact match), so every figure is computed
under each normalization, applied to prediction and reference alike:
  none  outer whitespace stripped only (the seed project's protocol)
  nows  all whitespace removed (PaddleOCR-VL-For-Manga and manga-ocr)
  nfkc  whitespace removed + Unicode NFKC, so ！/! and full/half-width digits compare equal
  mangaocr  manga-ocr's output convention (manga_ocr_post_process): whitespace removed, … -> ..., runs of
        ・/. -> dots, ASCII letters, digits and symbols -> full width; results sit beside manga-ocr's protocol
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import editdistance
import jaconv

NORMALIZATIONS = ("none", "nows", "nfkc", "mangaocr")
_WS = re.compile(r"\s+")
_DOTS = re.compile("[・.]{2,}")


def manga_ocr_post_process(text: str) -> str:
    """manga-ocr's `post_process` (manga_ocr/ocr.py, 0.1.16), step for step; tested against the package.

    Shared by the `mangaocr` normalization and infer.manga_ocr.post_process, so the two cannot drift apart.
    """
    text = "".join(text.split())
    text = text.replace("…", "...")
    text = _DOTS.sub(lambda m: "." * len(m.group()), text)  # ・・・ and ... alike become ASCII dots
    return jaconv.h2z(text, ascii=True, digit=True)  # then ASCII (dots included) and digits -> full width


def normalize(text: str, mode: str = "none") -> str:
    if mode == "none":
        return text.strip()
    if mode == "nows":
        return _WS.sub("", text)
    if mode == "nfkc":
        return _WS.sub("", unicodedata.normalize("NFKC", text))
    if mode == "mangaocr":
        return manga_ocr_post_process(text)
    raise ValueError(f"unknown normalization {mode!r}; choose from {NORMALIZATIONS}")


def edit_distance(a: str, b: str) -> int:
    return editdistance.eval(a, b)


def align(ref: str, pred: str) -> list[tuple[str, str, str]]:
    """A minimum-edit alignment of `pred` to `ref`: (op, ref chars, pred chars) runs, op one of
    equal, sub, del (in ref, missing from pred), ins (in pred, not in ref).

    Plain Levenshtein table plus a backtrace, so the number of edits it shows equals edit_distance (tested);
    O(len(ref) * len(pred)), meant for the handful of crops a report shows, not for whole splits.
    """
    n, m = len(ref), len(pred)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (ref[i - 1] != pred[j - 1]))
    ops: list[tuple[str, str, str]] = []
    i, j = n, m
    # Walk back. Among equally short alignments prefer matches, then deletions/insertions, then substitutions:
    # "ef" -> "f!" reads as "e deleted, f kept, ! inserted" rather than two substitutions.
    while i or j:
        if i and j and ref[i - 1] == pred[j - 1] and d[i][j] == d[i - 1][j - 1]:
            op, a, b = "equal", ref[i - 1], pred[j - 1]
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            op, a, b = "del", ref[i - 1], ""
            i -= 1
        elif j and d[i][j] == d[i][j - 1] + 1:
            op, a, b = "ins", "", pred[j - 1]
            j -= 1
        else:
            op, a, b = "sub", ref[i - 1], pred[j - 1]
            i, j = i - 1, j - 1
        if ops and ops[-1][0] == op:  # merge runs of the same op (built backwards, so prepend)
            ops[-1] = (op, a + ops[-1][1], b + ops[-1][2])
        else:
            ops.append((op, a, b))
    return ops[::-1]


def cer_metrics(
    predictions: Iterable[str], references: Iterable[str], mode: str = "none"
) -> dict[str, float]:
    """Corpus CER (total edits / total reference chars), mean per-sample CER, exact match, all in [0, 1+]."""
    edits = ref_chars = exact = n = 0
    per_sample = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        p, r = normalize(pred, mode), normalize(ref, mode)
        d = edit_distance(p, r)
        edits += d
        ref_chars += len(r)
        per_sample += d / max(len(r), 1)  # the seed's definition: an empty reference counts as length 1
        exact += p == r
        n += 1
    return {
        # max(.., 1) as in the per-sample definition: all-empty references give edits/1, not a ZeroDivision.
        "cer": edits / max(ref_chars, 1),
        "cer_mean": per_sample / n if n else 0.0,
        "exact_match": exact / n if n else 0.0,
        "edits": edits,
        "ref_chars": ref_chars,
        "n": n,
    }


def all_metrics(predictions: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    return {mode: cer_metrics(predictions, references, mode) for mode in NORMALIZATIONS}


# --- By confidence (issue 29): do a reading's own token probabilities tell good lines from bad? Rows are
# predictions.jsonl records (reference, edits under normalization none, stop, confidence).

STOPS = ("eos", "cap", "loop")


def stop_counts(rows: list[dict]) -> dict[str, int]:
    """How generation ended: eos (the model finished), cap (the token cap cut it) or loop (the guard)."""
    return {k: sum(r.get("stop") == k for r in rows) for k in STOPS}


def confidence_missing(rows: list[dict]) -> str | None:
    """Why the rows cannot be ranked by confidence, or None when every one carries it."""
    bare = sum(not isinstance(r.get("confidence"), int | float) or r["confidence"] != r["confidence"]
               for r in rows)  # absent, null or NaN
    if not rows:
        return "no predictions"
    if bare:
        return (f"{bare} of {len(rows)} predictions carry no confidence: predictions.jsonl was begun before "
                "evaluation stored it, and this run continued it; evaluate into a new --output_dir for it")
    return None


def by_confidence(rows: list[dict]) -> list[dict]:
    """Most confident first; ties in id order, so the split does not depend on the file's order."""
    return sorted(rows, key=lambda r: (-r["confidence"], r["id"]))


def group_scores(rows: list[dict]) -> dict:
    """CER (corpus: edits / reference chars), exact match and stop reasons of a group of rows (none)."""
    ref_chars = sum(len(normalize(r["reference"])) for r in rows)
    return {"n": len(rows), "confidence_min": min(r["confidence"] for r in rows),
            "confidence_max": max(r["confidence"] for r in rows),
            "cer": sum(r["edits"] for r in rows) / max(ref_chars, 1),
            "exact_match": sum(r["edits"] == 0 for r in rows) / len(rows),
            "stops": stop_counts(rows)}


def confidence_groups(rows: list[dict], k: int) -> list[dict]:
    """The rows ranked by confidence and cut into k groups of equal size (± 1, the larger ones first: the
    top half of an odd count holds the middle line), most confident first; a group left empty (fewer rows
    than k) is dropped."""
    ranked, n = by_confidence(rows), len(rows)
    cuts = [-(-i * n // k) for i in range(k + 1)]  # ceil(i * n / k)
    return [group_scores(ranked[a:b]) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def kept_curve(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(share of lines kept, CER of the kept lines, threshold) for every threshold "keep the lines with
    confidence >= t" that keeps a different set: t runs over the distinct confidences, highest first."""
    ranked, points = by_confidence(rows), []
    edits = ref_chars = 0
    for i, r in enumerate(ranked):
        edits += r["edits"]
        ref_chars += len(normalize(r["reference"]))
        if i + 1 == len(ranked) or ranked[i + 1]["confidence"] < r["confidence"]:
            points.append(((i + 1) / len(ranked), edits / max(ref_chars, 1), r["confidence"]))
    return points
