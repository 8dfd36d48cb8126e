"""The pipeline on tiny checkpoints laid out like the real release (tools/make_tiny_model.build_release_like):
its tokenizer (space merges, byte fallback, token ids), its v1 and 1.5 chat templates, its processor config
and its weight layout, including the tensors transformers does not load."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
import paddleocr_vl_manga.export.layout as export_model
import paddleocr_vl_manga.infer.predict as predict
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.run as sft
from paddleocr_vl_manga.data.collator import OCRCollator, generation_batch, generation_prompt
from paddleocr_vl_manga.data.dataset import OCRDataset, load_image, read_jsonl
from paddleocr_vl_manga.data.lengths import sequence_lengths
from paddleocr_vl_manga.model.generation import generate_texts
from paddleocr_vl_manga.model.loading import ModelLoadError, load_model_and_processor
from tools.make_synthetic_manga109 import CHARSET

# transformers' integration test on PaddlePaddle/PaddleOCR-VL: the prompt starts
# <|begin_of_sentence|> User : ▁ <|IMAGE_START|>, then the image tokens, and (v1) ends
# <|IMAGE_END|> O CR : \n Assistant : ▁ ; 1.5 and 1.6 end "Assistant:\n" instead.
HEAD = [100273, 2969, 93963, 93919, 101305]
TAIL = {"v1": [101306, 93972, 2497, 93963, 23, 92267, 93963, 93919],
        "v1.5": [101306, 93972, 2497, 93963, 23, 92267, 93963, 23]}
IMAGE_ID, EOS = 100295, 2
# Answers a one-pass tokenization merges into the prompt's final "▁" (the BoundaryError crash on v1).
MERGING = ["OK", "3日後", "Dr. X"]
MODEL_FILES = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
               "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def marker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "renders the image without" in r.getMessage()]


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_fixture_has_the_release_layout(release_model, version: str) -> None:
    base = release_model(version)
    assert {p.name for p in base.iterdir()} == MODEL_FILES
    config = json.loads((base / "config.json").read_text())
    assert "text_config" not in config and config["vocab_size"] == 103424  # flat, 103424 embedding rows
    keys = ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id")
    assert [config[k] for k in keys] == [100295, 101305, 101306, 101307] and not config["tie_word_embeddings"]
    assert json.loads((base / "generation_config.json").read_text()) == {
        "eos_token_id": 2, "pad_token_id": 0, "use_cache": False}
    pre = json.loads((base / "preprocessor_config.json").read_text())
    pixels = {"v1": (147384, 2822400), "v1.5": (112896, 1003520)}[version]
    assert (pre["min_pixels"], pre["max_pixels"]) == pixels and "size" not in pre
    assert (pre["image_mean"], pre["resample"], pre["patch_size"], pre["merge_size"]) == ([0.5] * 3, 3, 14, 2)

    weights = tensors(base)
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == {"mlp_AR", "visual", "model", "lm_head"} and "lm_head.weight" in weights
    assert "visual.vision_model.embeddings.packing_position_embedding.weight" in weights
    assert any(k.startswith("visual.vision_model.head.") for k in weights)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert weights["model.embed_tokens.weight"].shape[0] == 103424

    tok = AutoProcessor.from_pretrained(base).tokenizer
    assert len(tok) == 101314 and (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == 0 and tok("\n", add_special_tokens=False).input_ids == [23]  # byte fallback
    # " w" is one token ▁w (296); "User" at the start gets no "▁"
    assert tok(" w", add_special_tokens=False).input_ids == [296]
    assert tok.convert_ids_to_tokens(tok("User: OK", add_special_tokens=False).input_ids) == [
        "User", ":", "▁O", "K"]
    # every character of the synthetic data is a token of its own (neither <unk> nor byte fallback)
    ids = [tok(c, add_special_tokens=False).input_ids for c in CHARSET]
    assert all(len(i) == 1 and i[0] > 268 for i in ids)


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_loader_gives_the_release_prompt(release_model, version: str, caplog) -> None:
    base = release_model(version)
    raw = AutoProcessor.from_pretrained(base)
    rendered = raw.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]}],
        add_generation_prompt=True,
    )
    # transformers 5 on the v1 template drops the image markers (the bug the loader corrects)
    assert ("<|IMAGE_START|>" in rendered) == (version != "v1")

    with caplog.at_level(logging.WARNING):
        _, processor = load_model_and_processor(str(base))
    warnings = marker_warnings(caplog)
    assert len(warnings) == (1 if version == "v1" else 0)
    assert all(str(base / "chat_template.jinja") in w for w in warnings)

    batch = generation_batch(processor, [Image.new("RGB", (40, 120), "white")])
    ids = batch["input_ids"][0].tolist()
    n = ids.count(IMAGE_ID)
    assert n > 100  # the release's min_pixels upscales a small crop to ~150-190 image tokens
    assert ids == HEAD + [IMAGE_ID] * n + TAIL[version]


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_training_ids_are_generation_ids(release_model, prepared: Path, version: str) -> None:
    _, processor = load_model_and_processor(str(release_model(version)))
    ds = OCRDataset(prepared / "train.jsonl", max_samples=5)
    texts = [*MERGING, "魔王様！行くぞ！", ""]
    batch = OCRCollator(processor, max_length=None)(
        [{**ds[i], "text": t, "id": i} for i, t in enumerate(texts)]
    )
    gen = generation_batch(processor, [ds[i]["image"] for i in range(len(texts))])
    tok = processor.tokenizer
    for row, text in enumerate(texts):
        prompt = gen["input_ids"][row][gen["attention_mask"][row].bool()].tolist()
        n, p = int(batch["attention_mask"][row].sum()), len(prompt)
        answer = tok(text, add_special_tokens=False).input_ids + [EOS]
        assert batch["input_ids"][row, :p].tolist() == prompt  # exactly what generation feeds
        assert batch["input_ids"][row, p:n].tolist() == answer == batch["labels"][row, p:n].tolist()
        assert (batch["labels"][row, :p] == -100).all() and (batch["labels"][row, n:] == -100).all()
    # ... while one pass over prompt + answer would have merged the prompt's final "▁" into the answer
    one_pass = tok(generation_prompt(processor) + "OK", add_special_tokens=False).input_ids
    if version == "v1":
        assert tok.convert_ids_to_tokens(one_pass[-2:]) == ["▁O", "K"]
    lengths = OCRCollator(processor, max_length=None)([ds[i] for i in range(5)])["attention_mask"].sum(1)
    assert sequence_lengths(ds, processor) == lengths.tolist()


def test_unexpected_template_or_ids_fail_naming_the_file(release_model, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(release_model("v1.5"), folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template.replace('"Assistant:\\n"', '"Bot: "'))
    with pytest.raises(ModelLoadError, match=re.escape(str(folder / "chat_template.jinja")) + ".*Bot: "):
        load_model_and_processor(str(folder))
    (folder / "chat_template.jinja").write_text(template)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_start_token_id": 101307}))
    with pytest.raises(ModelLoadError, match="vision_start_token_id=101307"):
        load_model_and_processor(str(folder))


def training_data(prepared: Path, dst: Path) -> Path:
    """8 train crops, the first answers starting with a Latin letter or digit; val as prepared."""
    dst.mkdir()
    recs = read_jsonl(prepared / "train.jsonl")[:8]
    with open(dst / "train.jsonl", "w", encoding="utf-8") as f:
        for r, text in zip(recs, [*MERGING, *(r["text"] for r in recs[3:])], strict=True):
            f.write(json.dumps({**r, "image": r["image_path"], "text": text}, ensure_ascii=False) + "\n")
    shutil.copy(prepared / "val.jsonl", dst / "val.jsonl")
    shutil.copytree(prepared / "crops", dst / "crops")
    return dst


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_pipeline_and_export(release_model, prepared: Path, tmp_path: Path, version: str, capsys) -> None:
    """Train a few steps, export, evaluate and predict; the output drops in where the base did."""
    base, out = release_model(version), tmp_path / "sft"
    data = training_data(prepared, tmp_path / "data")
    # 1.5 also trains with other pixel bounds: the export must carry exactly that change
    pixels = ["--min_pixels", "3136", "--max_pixels", "50176"] if version == "v1.5" else []
    rc = sft.main([
        "--model_path", str(base), "--data_dir", str(data), "--output_dir", str(out), "--report_to", "none",
        "--disable_tqdm", "true", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--max_eval_samples", "4",
        "--eval_generation_samples", "4", "--generation_max_new_tokens", "4", *pixels,
    ])
    assert rc == 0

    # The base's file set: every file unchanged but the pixel bounds a flag changed, no transformers extras.
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert written & (MODEL_FILES | {"processor_config.json"}) == MODEL_FILES
    for name in MODEL_FILES - {"model.safetensors", "preprocessor_config.json"}:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    pre, base_pre = (json.loads((d / "preprocessor_config.json").read_text()) for d in (out, base))
    if pixels:
        assert {k for k in pre if pre[k] != base_pre[k]} == {"min_pixels", "max_pixels"}
        assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 50176)
        # ... and whoever loads the model reads at the budget it was trained with, unless told otherwise
        from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

        size = MangaOcr(out, force_cpu=True).processor.image_processor.size
        assert (size["shortest_edge"], size["longest_edge"]) == (3136, 50176)
    else:
        assert pre == base_pre

    # Weights: the base's names, shapes and dtypes; what transformers does not load is the base's bytes.
    got, want = tensors(out), tensors(base)
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    skipped = [k for k in want if any(re.search(p, k) for p in export_model.NOT_LOADED)]
    assert len(skipped) >= 2 and all(torch.equal(got[k].view(torch.int16), want[k].view(torch.int16))
                                     for k in skipped)
    assert not torch.equal(got["lm_head.weight"], want["lm_head.weight"])  # trained

    # The export command on the last checkpoint gives the same folder as the in-place export of training.
    cli = tmp_path / "cli"
    assert export_model.main([str(out / "checkpoint-2"), "--base", str(base), "--out", str(cli)]) == 0
    assert {p.name for p in cli.iterdir()} == MODEL_FILES | {"output_vocabulary.json"}  # the run's labels'
    for name in MODEL_FILES | {"output_vocabulary.json"}:
        assert (cli / name).read_bytes() == (out / name).read_bytes(), name

    # Loads with the plain Auto classes and with our loader, predicting as the checkpoint in the base's dtype.
    AutoModelForImageTextToText.from_pretrained(out)
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "PaddleOCRVLProcessor"
    exported, processor = load_model_and_processor(str(out), dtype=torch.float32)
    before, _ = load_model_and_processor(str(out / "checkpoint-2"), dtype=torch.bfloat16)
    images = [load_image(r, "val") for r in read_jsonl(data / "val.jsonl")[:4]]
    want_texts = generate_texts(before.float(), processor, images, max_new_tokens=4)
    assert generate_texts(exported, processor, images, max_new_tokens=4) == want_texts

    assert evaluate_model.main([
        "--model_path", str(out), "--data_dir", str(prepared), "--split", "test", "--num_samples", "4",
        "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval"),
    ]) == 0
    paths = [r["image_path"] for r in read_jsonl(data / "val.jsonl")[:4]]
    capsys.readouterr()
    assert predict.main(["--model_path", str(out), *paths, "--max_new_tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t", 1)[1] for line in lines] == [t.replace("\n", "\\n") for t in want_texts]


def test_lora_output_has_the_base_layout(release_model, prepared: Path, tmp_path: Path) -> None:
    """--lora_r: the merged final model has the base's files, names, shapes and dtypes; only the decoder's
    projections differ from the base; evaluate and predict take it; the adapter sits in adapter/."""
    base, out = release_model("v1"), tmp_path / "sft"
    data = training_data(prepared, tmp_path / "data")
    rc = sft.main([
        "--model_path", str(base), "--data_dir", str(data), "--output_dir", str(out), "--report_to", "none",
        "--disable_tqdm", "true", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--save_strategy", "no", "--eval_strategy", "no", "--lora_r", "4",
    ])
    assert rc == 0
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert written & (MODEL_FILES | {"processor_config.json"}) == MODEL_FILES
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    got, want = tensors(out), tensors(base)
    assert list(got) == list(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
    decoder = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
    changed = {k for k in want if not torch.equal(got[k].view(torch.int16), want[k].view(torch.int16))}
    assert changed == {k for k in want if decoder.fullmatch(k)} and len(changed) == 14  # 2 layers x 7
    assert evaluate_model.main([
        "--model_path", str(out), "--data_dir", str(prepared), "--split", "test", "--num_samples", "4",
        "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval"),
    ]) == 0
    paths = [r["image_path"] for r in read_jsonl(data / "val.jsonl")[:2]]
    assert predict.main(["--model_path", str(out), *paths, "--max_new_tokens", "4"]) == 0


def test_export_refuses_a_checkpoint_of_another_base(release_model, tiny_model: Path, tmp_path: Path,
                                                      error_line) -> None:
    base = release_model("v1")
    rc = export_model.main([str(tiny_model), "--base", str(base), "--out", str(tmp_path / "x")])
    assert "does not match the base" in error_line(rc)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    rc = export_model.main([str(tiny_model), "--base", str(tiny_model), "--out", str(tmp_path / "full")])
    assert "not empty" in error_line(rc)


def test_export_keeps_a_sharded_base_layout(release_model, tmp_path: Path) -> None:
    """A base in two shards + index: the export has the same shards, each with the same tensors."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(release_model("v1"), base)
    weights = tensors(base)
    (base / "model.safetensors").unlink()
    names = list(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(base / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_model_and_processor(str(base))
    model.save_pretrained(tmp_path / "ckpt")  # as training saves: one file, without the skipped tensors

    out = export_model.export_model(tmp_path / "ckpt", str(base), tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {p.name for p in base.iterdir()}
    for file, keys in shards.items():
        with safe_open(str(out / file), framework="pt") as f:
            assert sorted(f.keys()) == sorted(keys)
            assert all(torch.equal(f.get_tensor(k), weights[k]) for k in keys)  # untrained: all equal
    index_file = "model.safetensors.index.json"
    assert (out / index_file).read_bytes() == (base / index_file).read_bytes()


def test_failed_export_fails_the_run_with_a_hint(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                  monkeypatch, error_line) -> None:
    def broken(*args, **kwargs):
        raise export_model.ExportError("disk on fire")

    monkeypatch.setattr(sft_build, "export_model", broken)
    rc = sft.main([
        "--model_path", str(tiny_model), "--data_dir", str(prepared), "--output_dir", str(tmp_path / "o"),
        "--max_steps", "1", "--max_train_samples", "2", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true",
    ])
    assert "disk on fire" in error_line(rc)
    assert (tmp_path / "o" / "model.safetensors").is_file()  # the weights stay, as transformers saved them
