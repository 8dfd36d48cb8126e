"""Answer labels are the text's own tokens whether the tokenizer adds a prefix space or not.

transformers 5's Llama-style SentencePiece tokenizers default to add_prefix_space=True; the release was
converted without it. At generation the prompt ends in a standalone "▁" and the model generates the answer
after it, so the labelled tokens must be the text tokenized with no space added, on either setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from custom_collator import RELEASE_PROMPTS, OCRCollator, answer_ids, whitespace_start
from tools.make_tiny_model import build_release_tokenizer, release_processor

# kana, kanji (byte fallback), Latin after which the release merges "▁" ("▁O"), full-width, an inner space
TEXTS = ["あ", "生甘草", "OK", "ＯＫ、１２３", "x1", "魔王様 OK！"]


@pytest.fixture(scope="module")
def tokenizers() -> dict[bool, object]:
    return {prefix: build_release_tokenizer(add_prefix_space=prefix) for prefix in (False, True)}


def test_fixture_with_prefix_space_puts_a_space_before_a_text(tokenizers) -> None:
    """The premise: on its own, a text gets a leading "▁" (bare or merged) from one setting only."""
    for text in TEXTS:
        plain = tokenizers[False].tokenize(text)
        prefixed = tokenizers[True].tokenize(text)
        assert not plain[0].startswith("▁") and prefixed[0].startswith("▁"), (text, plain, prefixed)


def test_answer_ids_same_on_either_prefix_space_setting(tokenizers) -> None:
    assert answer_ids(tokenizers[True], TEXTS) == answer_ids(tokenizers[False], TEXTS)


def test_answer_ids_are_the_text_with_no_space_added(tokenizers) -> None:
    eos = tokenizers[False].eos_token_id
    for tok in tokenizers.values():
        for text, ids in zip(TEXTS, answer_ids(tok, TEXTS), strict=True):
            pieces = tok.convert_ids_to_tokens(ids)
            assert ids[-1] == eos and not pieces[0].startswith("▁"), (text, pieces)
            assert not whitespace_start(tok, ids)
            assert tok.decode(ids[:-1]) == text


def test_prompt_then_answer_is_what_generation_sees(tokenizers) -> None:
    """The prompt (it starts with a special token) tokenizes the same on both settings and ends in its
    standalone "▁"; prompt + answer ids decode to prompt + text, with no second space between them."""
    text = RELEASE_PROMPTS[0]  # v1's: it ends "Assistant: " (the loader corrects the v1 template)
    prompts = {}
    for prefix, tok in tokenizers.items():
        prompts[prefix] = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(prompts[prefix][-1]) == "▁"
        for answer, ids in zip(TEXTS, answer_ids(tok, TEXTS), strict=True):
            assert tok.decode(prompts[prefix] + ids[:-1]) == text + answer
    assert prompts[True] == prompts[False]


def test_collator_labels_same_on_either_prefix_space_setting(prepared: Path) -> None:
    """The training batch of the release-like 1.5 processor (its template renders as the release's)."""
    from ocr_dataset import OCRDataset

    ds = OCRDataset(prepared / "train.jsonl", max_samples=3)
    exs = [{**ds[i], "text": t} for i, t in enumerate(["OK", "あいう", "魔王様 OK！"])]
    batches = [OCRCollator(release_processor("v1.5", add_prefix_space=p))(exs) for p in (False, True)]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batches[0][key], batches[1][key]), key


def test_saved_and_reloaded_prefix_space_tokenizer_keeps_its_setting_and_labels(tokenizers,
                                                                                tmp_path: Path) -> None:
    """A user's tokenizer comes from disk: the setting survives save/load, and so do the right labels."""
    tokenizers[True].save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.tokenize("あ")[0] == "▁"
    assert answer_ids(loaded, TEXTS) == answer_ids(tokenizers[False], TEXTS)


def test_whitespace_start_spots_a_bare_space_label(tokenizers) -> None:
    tok = tokenizers[True]
    naive = tok(["あ"], add_special_tokens=False)["input_ids"][0]  # what tokenizing on its own gives
    assert whitespace_start(tok, naive)
    assert not whitespace_start(tok, answer_ids(tok, ["あ"])[0])
