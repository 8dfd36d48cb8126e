"""OCR metrics shared by training-time evaluation, evaluate_model.py and the benchmarks.

Two published protocols disagree on the same model (9 % vs 27 % exact match), so every figure is computed
under each normalization, applied to prediction and reference alike:
  none  outer whitespace stripped only (the seed project's protocol)
  nows  all whitespace removed (PaddleOCR-VL-For-Manga and manga-ocr)
  nfkc  whitespace removed + Unicode NFKC, so ！/! and full/half-width digits compare equal
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import editdistance

NORMALIZATIONS = ("none", "nows", "nfkc")
_WS = re.compile(r"\s+")


def normalize(text: str, mode: str = "none") -> str:
    if mode == "none":
        return text.strip()
    if mode == "nows":
        return _WS.sub("", text)
    if mode == "nfkc":
        return _WS.sub("", unicodedata.normalize("NFKC", text))
    raise ValueError(f"unknown normalization {mode!r}; choose from {NORMALIZATIONS}")


def edit_distance(a: str, b: str) -> int:
    return editdistance.eval(a, b)


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
