"""ocr_metrics against values worked out by hand (edit distances counted character by character)."""

from __future__ import annotations

import random

import pytest

from paddleocr_vl_manga.evaluate.metrics import (
    NORMALIZATIONS,
    align,
    all_metrics,
    cer_metrics,
    edit_distance,
    normalize,
)


def test_normalize_each_mode() -> None:
    text = "\u3000ア イ！ １０\n"  # ideographic space, ASCII space, full-width ! and digits, newline
    assert normalize(text, "none") == "ア イ！ １０"  # outer whitespace only (U+3000 included)
    assert normalize(text, "nows") == "アイ！１０"
    assert normalize(text, "nfkc") == "アイ!10"
    # whitespace out; … -> ...; the run "...・・" (5) -> "....."; a lone ・ stays; ASCII, digits -> full width
    assert normalize(" ab 12…・・x・y\n", "mangaocr") == "ａｂ１２．．．．．ｘ・ｙ"
    with pytest.raises(ValueError, match="unknown normalization"):
        normalize(text, "lower")


# ref "ア イ！" vs pred "アイ!":
#   none: "ア イ！" (4 chars) vs "アイ!" -> delete the space + substitute ！->!   = 2 edits, CER 2/4
#   nows: "アイ！" (3 chars)  vs "アイ!" -> substitute ！->!                      = 1 edit,  CER 1/3
#   nfkc: "アイ!"  (3 chars)  vs "アイ!" -> identical                             = 0 edits, exact
@pytest.mark.parametrize(
    ("mode", "edits", "ref_chars", "cer", "exact"),
    [("none", 2, 4, 0.5, 0.0), ("nows", 1, 3, 1 / 3, 0.0), ("nfkc", 0, 3, 0.0, 1.0)],
)
def test_single_pair_per_normalization(
    mode: str, edits: int, ref_chars: int, cer: float, exact: float
) -> None:
    m = cer_metrics(["アイ!"], ["ア イ！"], mode)
    assert (m["edits"], m["ref_chars"], m["n"]) == (edits, ref_chars, 1)
    assert m["cer"] == pytest.approx(cer)
    assert m["cer_mean"] == pytest.approx(cer)  # one sample: corpus and mean agree
    assert m["exact_match"] == exact


def test_corpus_and_mean_cer_differ() -> None:
    # "abcd" exact (0/4) and "x"->"y" (1/1): corpus = 1 edit / 5 chars, mean = (0 + 1) / 2.
    m = cer_metrics(["abcd", "y"], ["abcd", "x"], "none")
    assert (m["edits"], m["ref_chars"]) == (1, 5)
    assert m["cer"] == pytest.approx(0.2)
    assert m["cer_mean"] == pytest.approx(0.5)
    assert m["exact_match"] == pytest.approx(0.5)


def test_empty_prediction_costs_every_reference_char() -> None:
    m = cer_metrics([""], ["こんにちは"], "none")
    assert (m["edits"], m["ref_chars"], m["cer"], m["cer_mean"], m["exact_match"]) == (5, 5, 1.0, 1.0, 0.0)


def test_empty_references() -> None:
    # "" vs "ab": 2 edits, the empty reference counts as length 1 -> per-sample CER 2.
    # "" vs "":   0 edits, exact.  Corpus: 2 edits / max(0 chars, 1) = 2; mean (2 + 0) / 2 = 1.
    m = cer_metrics(["ab", ""], ["", ""], "none")
    assert (m["edits"], m["ref_chars"], m["n"]) == (2, 0, 2)
    assert m["cer"] == pytest.approx(2.0)
    assert m["cer_mean"] == pytest.approx(1.0)
    assert m["exact_match"] == pytest.approx(0.5)
    # Whitespace-only strings are empty after normalization, so they match.
    assert cer_metrics(["  "], ["\u3000"], "none")["exact_match"] == 1.0


def test_mixed_corpus_all_normalizations() -> None:
    preds = ["アイ!", "", "x", "10年"]
    refs = ["ア イ！", "こんにちは", "", "１０年"]
    # per pair (edits / len(ref)):   none          nows          nfkc          mangaocr (! -> ！, 10 -> １０)
    #   アイ! vs ア イ！             2/4           1/3           0/3           0/3
    #   "" vs こんにちは             5/5           5/5           5/5           5/5
    #   x vs ""                      1/max(0,1)    1/1           1/1           1/1 (ｘ)
    #   10年 vs １０年               2/3           2/3           0/3 (exact)   0/3 (exact)
    expected = {
        "none": (10, 12, (0.5 + 1 + 1 + 2 / 3) / 4, 0.0),
        "nows": (9, 11, (1 / 3 + 1 + 1 + 2 / 3) / 4, 0.0),
        "nfkc": (6, 11, (0 + 1 + 1 + 0) / 4, 0.5),
        "mangaocr": (6, 11, (0 + 1 + 1 + 0) / 4, 0.5),
    }
    got = all_metrics(preds, refs)
    assert set(got) == set(NORMALIZATIONS)
    for mode, (edits, ref_chars, mean, exact) in expected.items():
        m = got[mode]
        assert (m["edits"], m["ref_chars"], m["n"]) == (edits, ref_chars, 4), mode
        assert m["cer"] == pytest.approx(edits / ref_chars), mode
        assert m["cer_mean"] == pytest.approx(mean), mode
        assert m["exact_match"] == pytest.approx(exact), mode


def test_no_samples_and_length_mismatch() -> None:
    m = cer_metrics([], [], "none")
    assert (m["cer"], m["cer_mean"], m["exact_match"], m["n"]) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError):
        cer_metrics(["a"], ["a", "b"], "none")


def test_align_by_hand() -> None:
    # ref "abcdef" -> pred "aXcdf!": b->X substituted, e deleted, ! inserted (3 edits)
    assert align("abcdef", "aXcdf!") == [("equal", "a", "a"), ("sub", "b", "X"), ("equal", "cd", "cd"),
                                         ("del", "e", ""), ("equal", "f", "f"), ("ins", "", "!")]
    assert align("", "ab") == [("ins", "", "ab")] and align("ab", "") == [("del", "ab", "")]
    assert align("", "") == []


def test_align_is_a_minimum_edit_alignment() -> None:
    rng = random.Random(0)
    for _ in range(500):
        ref, pred = ("".join(rng.choice("アイウ.") for _ in range(rng.randint(0, 9))) for _ in range(2))
        ops = align(ref, pred)
        assert "".join(a for _, a, _ in ops) == ref and "".join(b for _, _, b in ops) == pred
        assert all((a == b) == (op == "equal") for op, a, b in ops if op in ("equal", "sub"))
        cost = sum(max(len(a), len(b)) for op, a, b in ops if op != "equal")
        assert cost == edit_distance(ref, pred), (ref, pred, ops)
