"""One owner of sample lengths: each split's token lengths, computed once, and which crops fit max_length.

A sample is the generation prompt with the crop's image tokens, then the answer and eos, exactly as
data.collator builds it. Lengths come from the JSONL's width/height (the crop padded into a shape the
processor takes, data.dataset.fit_image) and the answer's tokens: no image is decoded. With augmentation a
crop may grow by up to 2 * AUG_PAD px each way, so its length is the worst case over that growth. Training
filters train and val by this one rule (and counts test), evaluate_model.py --max_length does the same, so
no batch ever meets a crop it cannot hold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from paddleocr_vl_manga.data.collator import answer_ids, num_image_tokens, prompt_ids
from paddleocr_vl_manga.data.dataset import AUG_PAD, DatasetError, OCRDataset, fitted_size

logger = logging.getLogger("sample_lengths")  # the name before the move to paddleocr_vl_manga
SUMMARY_FILE = "sample_lengths.json"


def image_tokens(
    processor: Any, width: int, height: int, *, augment: bool = False, memo: dict | None = None
) -> int:
    """Image tokens of a crop; with augment, the most any padding augment() may add can give. `memo`
    keeps counts per size across calls (neighbouring crop sizes share most of their padded sizes)."""
    memo = {} if memo is None else memo

    def tokens(w: int, h: int) -> int:
        if (w, h) not in memo:
            memo[w, h] = num_image_tokens(processor, w, h)
        return memo[w, h]

    if not augment:
        return tokens(width, height)
    grow = range(2 * AUG_PAD + 1)  # resizing is not monotonic in each side: try every padded size
    return max(tokens(width + dx, height + dy) for dx in grow for dy in grow)


def sequence_lengths(
    ds: OCRDataset, processor: Any, *, augment: bool = False, answers: list[list[int]] | None = None
) -> list[int]:
    """Token count of each sample (prompt + image tokens + answer + eos), as the collator builds it.
    `answers`: the records' answer_ids when the caller has them already (150k answers are tokenized once)."""
    n_prompt = len(prompt_ids(processor)) - 1  # minus the placeholder, which becomes the image tokens
    if answers is None:
        answers = answer_ids(processor.tokenizer, [r["text"] for r in ds.records])
    cache: dict[tuple[int, int], int] = {}  # many crops share a size; the augmented worst case is 81 sizes
    memo: dict[tuple[int, int], int] = {}
    lengths = []
    for size, answer in zip(ds.image_sizes(), answers, strict=True):
        if size not in cache:
            cache[size] = image_tokens(processor, *size, augment=augment, memo=memo)
        lengths.append(n_prompt + cache[size] + len(answer))
    return lengths


@dataclass
class SplitLengths:
    """One split after filtering: what was kept, what was dropped, and what fit_image had to pad."""

    split: str
    crops: int
    max_length: int | None
    lengths: list[int] = field(repr=False)  # of the kept crops, in dataset order
    dropped: list[dict[str, Any]]  # id and length of each crop over max_length
    padded: int  # crops padded into a shape the processor takes

    def line(self, used: bool = True) -> str:
        """e.g. 'val: 1 of 1,203 crops over max_length 1,536 dropped'."""
        parts = []
        if self.max_length is not None:
            n = len(self.dropped)
            verdict = "dropped" if used else "(this split is not used here)"
            parts.append(f"{n:,} of {self.crops:,} crops over max_length {self.max_length:,} {verdict}")
        if self.padded:
            parts.append(f"{self.padded:,} of {self.crops:,} padded into a shape the image processor takes")
        return f"{self.split}: " + "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        lengths = d.pop("lengths")
        return {**d, "kept": len(lengths), "longest_kept": max(lengths, default=0)}


def filter_split(
    split: str, ds: OCRDataset, processor: Any, max_length: int | None, *, augment: bool = False,
    drop: bool = True, answers: list[list[int]] | None = None,
) -> SplitLengths:
    """Measure a split and (drop=True) remove its crops over max_length from `ds` in place."""
    lengths = sequence_lengths(ds, processor, augment=augment, answers=answers)
    over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    padded = sum(fitted_size(w, h) != (w, h) for w, h in ds.image_sizes())
    result = SplitLengths(
        split, len(lengths), max_length, lengths,
        [{"id": ds.records[i]["id"], "length": lengths[i]} for i in over], padded,
    )
    if drop and over:
        skip = set(over)
        ds.records = [r for i, r in enumerate(ds.records) if i not in skip]
        result.lengths = [n for i, n in enumerate(lengths) if i not in skip]
    return result


def check_fits(results: list[SplitLengths], on_overlong: str) -> None:
    """--on_overlong error: stop before any step when a split the run uses holds a crop over max_length."""
    bad = [r for r in results if r.dropped]
    if on_overlong == "error" and bad:
        detail = "; ".join(
            f"{r.split}: {len(r.dropped):,} of {r.crops:,} (e.g. {r.dropped[0]['id']}, "
            f"{r.dropped[0]['length']} tokens)" for r in bad
        )
        raise DatasetError(
            f"crops longer than max_length {bad[0].max_length:,}: {detail}. Raise --max_length, or use "
            "--on_overlong drop to leave them out (counted in the log and in " + SUMMARY_FILE + ")"
        )


def write_summary(path: Path, results: list[SplitLengths]) -> None:
    path.write_text(json.dumps({r.split: r.summary() for r in results}, ensure_ascii=False, indent=1) + "\n")
