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

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.inputs as sft_inputs
from paddleocr_vl_manga.data.collator import RELEASE_PROMPTS, OCRCollator, answer_ids, whitespace_start
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
    from paddleocr_vl_manga.data.dataset import OCRDataset

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


# ---------------------------------------------------------------- checked at training start, rehearsal


def with_first_text(prepared: Path, dst: Path, text: str, n: int = 6) -> Path:
    """A data folder of n train records (absolute image paths) whose first text is `text`, with val."""
    import json

    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        recs = [json.loads(line) for line in (prepared / f"{split}.jsonl").read_text().splitlines()][:n]
        if split == "train":
            recs[0]["text"] = text
        rows = [json.dumps({**r, "image": str(prepared / r["image"])}, ensure_ascii=False) for r in recs]
        (dst / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return dst


def sft_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_path", str(model), "--data_dir", str(data), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "1",
            "--eval_generation_samples", "2", *extra]


def test_training_start_logs_first_answer_ids_and_pieces(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from paddleocr_vl_manga.model.loading import load_config_and_processor

    data = with_first_text(prepared, tmp_path / "d", "OK魔王")
    tok = load_config_and_processor(str(tiny_model)).processor.tokenizer
    want = tok("OK魔王", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with caplog.at_level("INFO", logger="sft"):
        sft_inputs.train_data(*sft_arguments.parse_args(sft_argv(tiny_model, data, tmp_path / "o")))
    lines = [r.getMessage() for r in caplog.records if "answer tokens" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "'OK魔王'" in lines[0] and str(want) in lines[0]
    assert str(tok.convert_ids_to_tokens(want)) in lines[0]


def test_text_starting_with_whitespace_is_labelled_without_it(tokenizers) -> None:
    """Manga109 texts can start with a space, U+3000 or a newline (prepare keeps the XML's text; the metrics
    strip outer whitespace): the crop can't show it, and a label starting with it would teach a second space
    after the prompt's own."""
    for tok in tokenizers.values():
        padded = answer_ids(tok, [" OK", "\u3000あ", "\nあ", " 魔王"])
        assert padded == answer_ids(tok, ["OK", "あ", "あ", "魔王"])
        assert not any(whitespace_start(tok, ids) for ids in padded)


def test_text_starting_with_a_space_trains(tiny_model: Path, prepared: Path, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """One such crop among 150k must not refuse the run."""

    data = with_first_text(prepared, tmp_path / "d", " 魔王")
    tok = build_release_tokenizer()
    with caplog.at_level("INFO", logger="sft"):
        sft_inputs.train_data(*sft_arguments.parse_args(sft_argv(tiny_model, data, tmp_path / "o")))
    (line,) = [r.getMessage() for r in caplog.records if "answer tokens" in r.getMessage()]
    assert str(tok.convert_ids_to_tokens(answer_ids(tok, ["魔王"])[0])) in line


@pytest.mark.parametrize("rehearse", [False, True])
def test_label_starting_with_a_space_stops_before_training(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                           error_line, monkeypatch: pytest.MonkeyPatch,
                                                           rehearse: bool) -> None:
    """A tokenizer whose prefix space answer_ids could not remove (simulated: "▁" put before every answer)."""
    import paddleocr_vl_manga.train.run as sft

    def spaced(tokenizer, texts):
        space = tokenizer(" ", add_special_tokens=False)["input_ids"][:1]
        return [space + ids for ids in answer_ids(tokenizer, texts)]

    monkeypatch.setattr(sft_inputs, "answer_ids", spaced)
    data = with_first_text(prepared, tmp_path / "d", "魔王")
    out = tmp_path / "o"
    rc = sft.main(sft_argv(tiny_model, data, out, *(["--rehearse", "true"] if rehearse else [])))
    line = error_line(rc)
    assert "6 of 6 train answers would be labelled starting with a whitespace-only token" in line
    assert "'魔王'" in line and "puts a space before the text" in line
    if rehearse:
        assert line.startswith("error: rehearsal failed at setup")
    assert not list(out.rglob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_prefix_space_the_labels_kept_would_be_caught(tokenizers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Had answer_ids kept the tokenizer's prefix space, the start-of-training check would stop the run: on
    all 6 answers, bare ("▁", "あ") or merged ("▁O", "K")."""

    tok = tokenizers[True]
    records = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
    assert "pieces ['あ', '</s>']" in sft_inputs.check_answer_tokens(tok, records)

    def naive(tokenizer, texts):
        plain = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [ids + [tokenizer.eos_token_id] for ids in plain]

    monkeypatch.setattr(sft_inputs, "answer_ids", naive)
    with pytest.raises(sft_inputs.AnswerTokenError, match=r"^6 of 6 .* 'r0' 'あ' -> pieces \['▁', 'あ'"):
        sft_inputs.check_answer_tokens(tok, records)


def test_rehearsal_reports_first_answer_tokens(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    import paddleocr_vl_manga.train.rehearsal as rehearsal

    data = with_first_text(prepared, tmp_path / "d", "OK魔王")
    m, d, a = sft_arguments.parse_args(sft_argv(tiny_model, data, tmp_path / "o"))
    full = rehearsal.prepare(m, d, a, tmp_path / "o" / rehearsal.FOLDER)
    assert full.answer_tokens.startswith("answer tokens of 'OK魔王' on this tokenizer: ids [")
