"""model/output_vocabulary.py: training records the label tokens, the export keeps them, inference computes
lm_head over just those rows (exact whenever the full model's greedy choice is among them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from training_helpers import StopAt, subset, train_args

import paddleocr_vl_manga.train.build as sft_build
from paddleocr_vl_manga.data.collator import answer_ids, generation_batch
from paddleocr_vl_manga.data.dataset import OCRDataset, load_image
from paddleocr_vl_manga.model.generation import generate_readings
from paddleocr_vl_manga.model.loading import ModelLoadError, load_for_inference
from paddleocr_vl_manga.model.output_vocabulary import (
    OUTPUT_VOCABULARY_FILE,
    OutputVocabularyError,
    RestrictedHead,
    write_output_vocabulary,
)

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def crops(prepared: Path) -> list:
    ds = OCRDataset(prepared / "train.jsonl", max_samples=6)
    return [load_image(r, "train") for r in ds.records]


def greedy(model, processor, images) -> tuple[list, list[list[int]]]:
    """Readings and the generated token ids of each crop (eos and padding included), through the project's
    own generation path (model.generation.generate_readings)."""
    ids: list[list[int]] = []
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        ids.extend(out[:, kwargs["input_ids"].shape[1]:].tolist())
        return out

    model.generate = spy
    try:
        readings = generate_readings(model, processor, images, batch_size=len(images),
                                     max_new_tokens=MAX_NEW_TOKENS)
    finally:
        del model.generate
    return readings, ids


def model_with_vocabulary(tiny_model: Path, folder: Path, ids: list[int] | str | None) -> Path:
    """A copy of the tiny model whose output_vocabulary.json holds `ids` (a str: written as it is)."""
    shutil.copytree(tiny_model, folder)
    if isinstance(ids, str):
        (folder / OUTPUT_VOCABULARY_FILE).write_text(ids)
    elif ids is not None:
        write_output_vocabulary(folder, ids)
    return folder


def test_restricted_head_gives_the_full_models_tokens_when_they_are_in_the_set(
        tiny_model: Path, crops: list, tmp_path: Path) -> None:
    full, processor, _ = load_for_inference(str(tiny_model))
    full_readings, full_ids = greedy(full, processor, crops)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    used = {i for row in full_ids for i in row} - {pad} | {eos}
    vocab_size = full.get_output_embeddings().out_features
    others = set(torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))[:40].tolist())
    vocabulary = sorted(used | others)
    assert len(vocabulary) < vocab_size
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", vocabulary)

    model, processor, _ = load_for_inference(str(folder))
    readings, ids = greedy(model, processor, crops)
    assert ids == full_ids
    assert [r.text for r in readings] == [r.text for r in full_readings]
    # the confidence is a probability within the set: never below the full vocabulary's
    assert all(r.confidence >= f.confidence - 1e-6 for r, f in zip(readings, full_readings, strict=True))
    head = model.get_output_embeddings()
    assert isinstance(head, RestrictedHead) and head.linear.weight.shape == (len(vocabulary), full.config.
                                                                              text_config.hidden_size)
    assert torch.equal(head.linear.weight, full.get_output_embeddings().weight[vocabulary])


def test_a_token_outside_the_set_gives_the_best_token_inside_it(tiny_model: Path, crops: list,
                                                                tmp_path: Path) -> None:
    full, processor, _ = load_for_inference(str(tiny_model))
    _, full_ids = greedy(full, processor, crops)
    eos, pad = processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id
    first = full_ids[0][0]
    vocabulary = sorted({i for row in full_ids for i in row} - {pad, first} | {eos})
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", vocabulary)
    model, processor, _ = load_for_inference(str(folder))
    _, ids = greedy(model, processor, crops)
    assert ids[0][0] != first
    assert {i for row in ids for i in row} - {pad} <= set(vocabulary)
    # the first step's choice is the full model's best among the set (the same rows give the same logits)
    batch = generation_batch(processor, crops[:1])
    with torch.inference_mode():
        logits = full(**batch).logits[0, -1]
    assert ids[0][0] == vocabulary[int(logits[vocabulary].argmax())]


def test_int8_quantizes_the_small_head_and_reads_the_same(tiny_model: Path, crops: list,
                                                          tmp_path: Path) -> None:
    full, processor, _ = load_for_inference(str(tiny_model), quantize="int8")
    full_readings, full_ids = greedy(full, processor, crops)
    pad = processor.tokenizer.pad_token_id
    vocabulary = sorted({i for row in full_ids for i in row} - {pad} | {processor.tokenizer.eos_token_id})
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", vocabulary)
    model, processor, _ = load_for_inference(str(folder), quantize="int8")
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    head = model.get_output_embeddings()
    assert isinstance(head.linear, Int8Linear) and head.linear.weight().shape[0] == len(vocabulary)
    readings, ids = greedy(model, processor, crops)
    # per output channel int8 scales: each kept row is quantized exactly as in the full head
    assert ids == full_ids and [r.text for r in readings] == [r.text for r in full_readings]


def test_full_vocabulary_turns_it_off(tiny_model: Path, tmp_path: Path) -> None:
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", [0, 1, 2])
    model, _, _ = load_for_inference(str(folder), full_vocabulary=True)
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear and head.out_features == model.config.text_config.vocab_size
    assert isinstance(load_for_inference(str(folder))[0].get_output_embeddings(), RestrictedHead)


def test_evaluate_predict_and_manga_ocr_use_it_unless_asked_not_to(tiny_model: Path, prepared: Path,
                                                                   tmp_path: Path, capsys) -> None:
    import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
    import paddleocr_vl_manga.infer.predict as predict
    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

    tok_size = load_for_inference(str(tiny_model))[0].get_output_embeddings().out_features
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", list(range(0, tok_size, 2)))
    k = len(range(0, tok_size, 2))
    heads = f"{k:,} of {tok_size:,} tokens", f"all {tok_size:,} tokens"
    for flag, head in zip(([], ["--full_vocabulary"]), heads, strict=True):
        out = tmp_path / f"eval{len(flag)}"
        assert evaluate_model.main(["--model_path", str(folder), "--data_dir", str(prepared), "--num_samples",
                                    "2", "--max_new_tokens", "2", "--output_dir", str(out), *flag]) == 0
        assert json.loads((out / "metrics.json").read_text())["lm_head"] == head
        assert f"lm_head: {head}" in capsys.readouterr().err
        image = str(prepared / json.loads((prepared / "test.jsonl").read_text().splitlines()[0])["image"])
        assert predict.main([image, "--model_path", str(folder), "--max_new_tokens", "2", *flag]) == 0
        assert f"lm_head: {head}" in capsys.readouterr().err
    assert isinstance(MangaOcr(folder).model.get_output_embeddings(), RestrictedHead)
    assert type(MangaOcr(folder, full_vocabulary=True).model.get_output_embeddings()) is nn.Linear


@pytest.mark.parametrize("content, why", [
    ("[0, 1, 99999999]", "not token ids of this model"),
    ("[0, -1]", "not token ids of this model"),
    ('[0, "7"]', "not token ids of this model"),
    ("[]", "non-empty JSON list"),
    ('{"ids": [1]}', "non-empty JSON list"),
    ("[1, 2", "not readable as JSON"),
])
def test_a_bad_file_is_one_line_naming_it(tiny_model: Path, prepared: Path, tmp_path: Path, error_line,
                                          content: str, why: str) -> None:
    import paddleocr_vl_manga.evaluate.evaluation as evaluate_model

    folder = model_with_vocabulary(tiny_model, tmp_path / "m", content)
    with pytest.raises(ModelLoadError, match=why):
        load_for_inference(str(folder))
    rc = evaluate_model.main(["--model_path", str(folder), "--data_dir", str(prepared), "--num_samples", "1",
                              "--output_dir", str(tmp_path / "eval")])
    line = error_line(rc)
    assert str(folder / OUTPUT_VOCABULARY_FILE) in line and why in line


def test_training_writes_the_label_tokens_and_the_export_keeps_them(tiny_model: Path, prepared: Path,
                                                                     tmp_path: Path) -> None:
    import paddleocr_vl_manga.export.layout as export_model

    data = subset(prepared, tmp_path / "d", 8)
    out = tmp_path / "out"
    # the base holds its own (a fine-tuned base): the run's labels decide, not the base's file
    base = model_with_vocabulary(tiny_model, tmp_path / "base", [0, 1, 2])
    trainer = sft_build.build_trainer(*train_args(base, data, out, "--max_steps", "2",
                                                  "--per_device_train_batch_size", "4", "--save_steps", "1"),
                                      callbacks=[StopAt(2)])
    trainer.train()
    tokenizer = trainer.processing_class.tokenizer
    texts = [json.loads(line)["text"] for line in (data / "train.jsonl").read_text().splitlines()]
    expected = sorted({i for ids in answer_ids(tokenizer, texts) for i in ids})
    assert tokenizer.eos_token_id in expected
    assert json.loads((out / "checkpoint-1" / OUTPUT_VOCABULARY_FILE).read_text()) == expected

    assert sft_build.save_final_model(trainer, str(base), str(out))
    assert json.loads((out / OUTPUT_VOCABULARY_FILE).read_text()) == expected
    exported = tmp_path / "exported"
    assert export_model.main([str(out / "checkpoint-2"), "--out", str(exported)]) == 0
    assert json.loads((exported / OUTPUT_VOCABULARY_FILE).read_text()) == expected
    model, _, _ = load_for_inference(str(exported))
    assert model.get_output_embeddings().linear.out_features == len(expected)


def test_bf16_weights_keep_their_dtype_and_read_the_same(tiny_model: Path, crops: list) -> None:
    """CUDA loads bf16 weights (model.loading.load_for_inference); the restricted head is built in the
    weights' dtype and device. Checked on the CPU here: no GPU in the test environment."""
    from paddleocr_vl_manga.model.loading import load_model_and_processor
    from paddleocr_vl_manga.model.output_vocabulary import restrict_lm_head

    full, processor = load_model_and_processor(str(tiny_model), dtype=torch.bfloat16)
    full_readings, full_ids = greedy(full, processor, crops)
    pad = processor.tokenizer.pad_token_id
    vocabulary = sorted({i for row in full_ids for i in row} - {pad} | {processor.tokenizer.eos_token_id})
    model, _ = load_model_and_processor(str(tiny_model), dtype=torch.bfloat16)
    restrict_lm_head(model, vocabulary)
    assert model.get_output_embeddings().linear.weight.dtype == torch.bfloat16
    readings, ids = greedy(model, processor, crops)
    assert ids == full_ids and [r.text for r in readings] == [r.text for r in full_readings]


def test_the_restricted_heads_load_line_says_what_it_cannot_write_and_the_way_off(
        tiny_model: Path, prepared: Path, tmp_path: Path, capsys) -> None:
    # A Manga109-only fine-tune meets a name or rare kanji no label had: the one line predict.py and
    # evaluate_model.py print at load is where the user can learn why, and which flag reads it.
    import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
    import paddleocr_vl_manga.infer.predict as predict

    folder = model_with_vocabulary(tiny_model, tmp_path / "m", [0, 1, 2])
    image = str(prepared / json.loads((prepared / "test.jsonl").read_text().splitlines()[0])["image"])
    assert predict.main([image, "--model_path", str(folder), "--max_new_tokens", "1"]) == 0
    printed = [capsys.readouterr().err]
    assert evaluate_model.main(["--model_path", str(folder), "--data_dir", str(prepared), "--num_samples",
                                "1", "--max_new_tokens", "1", "--output_dir", str(tmp_path / "e")]) == 0
    printed.append(capsys.readouterr().err)
    for err in printed:
        line = next(x for x in err.splitlines() if x.startswith("lm_head:"))
        assert "--full_vocabulary" in line and "cannot" in line


def test_saving_a_restricted_model_refuses_instead_of_writing_a_k_row_head(tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    # save_pretrained would write lm_head.linear.weight (k rows) and no lm_head.weight: a folder that loads
    # with a freshly initialised head. A library user saving MangaOcr(...).model must be stopped instead.
    folder = model_with_vocabulary(tiny_model, tmp_path / "m", [0, 1, 2])
    model, _, _ = load_for_inference(str(folder))
    with pytest.raises(OutputVocabularyError, match="full_vocabulary"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    torch.save(model, tmp_path / "pickled.pt")  # still a picklable model (no closure in its attributes)
    full, _, _ = load_for_inference(str(folder), full_vocabulary=True)
    full.save_pretrained(tmp_path / "saved_full")
    assert (tmp_path / "saved_full" / "model.safetensors").is_file()


def test_restricting_frees_the_full_heads_matrix(tiny_model: Path) -> None:
    import gc
    import weakref

    from paddleocr_vl_manga.model.loading import load_model_and_processor
    from paddleocr_vl_manga.model.output_vocabulary import restrict_lm_head

    model, _ = load_model_and_processor(str(tiny_model), dtype=torch.float32)
    full = weakref.ref(model.get_output_embeddings().weight)
    restrict_lm_head(model, [0, 1, 2])
    gc.collect()
    assert full() is None


def test_a_mixed_data_dir_records_the_tokens_of_every_folder(tiny_model: Path, prepared: Path,
                                                             tmp_path: Path) -> None:
    # DATA_DIR "manga109 synth:1": the synthetic folder's characters are trained on, so they are kept.
    from paddleocr_vl_manga.train.inputs import train_data

    first = subset(prepared, tmp_path / "a", 4)
    second = subset(prepared, tmp_path / "b", 4, split="test")
    model_args, data_args, args = train_args(tiny_model, Path(f"{first} {second}:1"), tmp_path / "out")
    data = train_data(model_args, data_args, args, decode=False)
    tokenizer = data.checked.processor.tokenizer
    texts = [r["text"] for r in data.train.records]
    assert {Path(r["_source"]).parent for r in data.train.records} == {first, second}
    assert list(data.output_vocabulary) == sorted({i for ids in answer_ids(tokenizer, texts) for i in ids})
    first_only = {i for ids in answer_ids(tokenizer, [r["text"] for r in data.train.records
                                                      if Path(r["_source"]).parent == first]) for i in ids}
    assert first_only < set(data.output_vocabulary)  # the second folder adds tokens: the check can fail


def test_an_old_checkpoint_without_the_file_exports_and_loads_with_the_full_head(tiny_model: Path,
                                                                                 tmp_path: Path) -> None:
    # a checkpoint saved before training wrote the file, exported against a base that has its own
    import paddleocr_vl_manga.export.layout as export_model

    base = model_with_vocabulary(tiny_model, tmp_path / "base", [0, 1, 2])
    old = model_with_vocabulary(tiny_model, tmp_path / "checkpoint-100", None)
    exported = tmp_path / "exported"
    assert export_model.main([str(old), "--base", str(base), "--out", str(exported)]) == 0
    assert not (exported / OUTPUT_VOCABULARY_FILE).exists()
    assert type(load_for_inference(str(exported))[0].get_output_embeddings()) is nn.Linear
