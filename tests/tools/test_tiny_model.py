"""Tests for the tiny random PaddleOCR-VL fixture (tools/make_tiny_model.py) and the loader (ocr_model.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from paddleocr_vl_manga.model.loading import ModelLoadError, load_model_and_processor
from tools.make_synthetic_manga109 import CHARSET
from tools.make_tiny_model import build_tiny_model, main

IMAGE = "<|IMAGE_PLACEHOLDER|>"
PROMPT = "<|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\nAssistant: "


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_model(tmp_path_factory.mktemp("untied"), charset=CHARSET))


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tied")
    return Path(build_tiny_model(out, charset=CHARSET, tie_word_embeddings=True))


@pytest.fixture(scope="module")
def loaded(untied_dir: Path):
    return load_model_and_processor(str(untied_dir))


def _conversation(image: Image.Image, answer: str | None = None) -> list[dict]:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "OCR:"}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _saved(folder: Path, name: str) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))[name]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr()


def test_loads_with_auto_classes_and_loader(untied_dir: Path, loaded) -> None:
    model = AutoModelForImageTextToText.from_pretrained(untied_dir)
    processor = AutoProcessor.from_pretrained(untied_dir)
    assert type(model).__name__ == "PaddleOCRVLForConditionalGeneration"
    assert type(processor).__name__ == "PaddleOCRVLProcessor"
    assert type(processor.image_processor).__name__.startswith("PaddleOCRVLImageProcessor")
    tok = processor.tokenizer
    assert tok.image_token == IMAGE and tok.image_token_id == model.config.image_token_id
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]  # as in the release
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|IMAGE_START|>")
    assert model.config.vision_end_token_id == tok.convert_tokens_to_ids("<|IMAGE_END|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert model.config.text_config.vocab_size == len(tok)

    our_model, our_processor = loaded
    assert type(our_model) is type(model) and type(our_processor) is type(processor)
    assert (untied_dir / "model.safetensors").stat().st_size < 5_000_000


def test_tokenizer_is_character_level(loaded) -> None:
    tok = loaded[1].tokenizer
    text = "".join(c for c in CHARSET if not c.isspace())[:200] + " OCR:\nAB12"
    ids = tok(text, add_special_tokens=True).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok("\U00020bb7").input_ids == [tok.unk_token_id]  # a character outside the charset


def test_chat_template_text(loaded) -> None:
    processor = loaded[1]
    image = Image.new("RGB", (40, 160), "white")
    train = processor.apply_chat_template(_conversation(image, "吾輩は猫"), tokenize=False)
    assert train == PROMPT + "吾輩は猫</s>"
    prompt = processor.apply_chat_template(_conversation(image), tokenize=False, add_generation_prompt=True)
    assert prompt == PROMPT


def test_apply_chat_template_two_images(loaded) -> None:
    processor = loaded[1]
    tok = processor.tokenizer
    images = [Image.new("RGB", (40, 160), "white"), Image.new("RGB", (120, 60), "gray")]
    answers = ["わがはいはねこである", "はい"]  # kana: in any charset the fixture is built from
    batch = processor.apply_chat_template(
        [_conversation(im, a) for im, a in zip(images, answers, strict=True)],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(
        batch
    )
    grid = batch["image_grid_thw"]
    merge = processor.image_processor.merge_size
    assert grid.shape == (2, 3) and grid[:, 0].tolist() == [1, 1]
    assert batch["pixel_values"].shape == (int(grid.prod(dim=1).sum()), 3, 14, 14)
    for row, answer in enumerate(answers):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row].bool()
        is_image = ids == tok.image_token_id
        assert int(is_image.sum()) == int(grid[row].prod()) // merge**2
        assert torch.equal(batch["mm_token_type_ids"][row].bool(), is_image)
        text = re.sub(f"({re.escape(IMAGE)})+", IMAGE, tok.decode(ids[mask]))
        assert text == PROMPT + answer + "</s>"
    assert not batch["attention_mask"].all()  # the two rows differ in length, so one is padded
    # 40x160 and 120x60 crops come out at 16 and 18 image tokens with the fixture's pixel budget
    assert (grid.prod(dim=1) // merge**2).tolist() == [16, 18]


class _OnlyEos(LogitsProcessor):
    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos_id] = 0.0
        return forced


def test_forward_loss_and_generate(loaded) -> None:
    model, processor = loaded
    image = Image.new("RGB", (40, 120), "white")
    batch = processor.apply_chat_template(
        [_conversation(image, "てすと")], tokenize=True, return_dict=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0

    prompt = processor.apply_chat_template(
        [_conversation(image)],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )
    n_prompt = prompt["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert n_prompt < out.shape[1] <= n_prompt + 6
    # Stops at the generation config's eos (</s>) when the model emits it.
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **prompt, max_new_tokens=6, logits_processor=LogitsProcessorList([_OnlyEos(eos)])
        )
    assert out[0, n_prompt:].tolist() == [eos]


def test_untied_lm_head_survives_loading(untied_dir: Path, loaded) -> None:
    model = loaded[0]
    lm_head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(lm_head, _saved(untied_dir, "lm_head.weight"))
    assert not _same_storage(lm_head, embed) and not torch.equal(lm_head, embed)


def _release_style_copy(src: Path, dst: Path) -> Path:
    """Rewrite config.json into the release's flat layout: text settings at the top level, no text_config."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    text = config.pop("text_config")
    for key in ("model_type", "tie_word_embeddings", "rope_parameters"):
        value = text.pop(key)
    text["rope_scaling"] = {
        "mrope_section": value["mrope_section"],
        "rope_type": "default",
        "type": "default",
    }
    text["rope_theta"] = value["rope_theta"]
    config.update(text, tie_word_embeddings=False)
    config["vision_config"]["model_type"] = "paddleocr_vl"  # what the release has; transformers fixes it up
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def test_release_style_config_keeps_lm_head_untied(untied_dir: Path, tmp_path: Path) -> None:
    folder = _release_style_copy(untied_dir, tmp_path / "flat")
    saved_lm_head = _saved(untied_dir, "lm_head.weight")

    # Plain from_pretrained: the BC forwarding in PaddleOCRVLConfig turns the flag into True. Whether the
    # weights end up tied depends on the transformers version; a later tie_weights() ties them for sure.
    plain = AutoModelForImageTextToText.from_pretrained(folder)
    plain_flag = plain.config.tie_word_embeddings
    plain.tie_weights()
    plain_tied = _same_storage(plain.get_output_embeddings().weight, plain.get_input_embeddings().weight)
    print(f"plain from_pretrained: tie_word_embeddings={plain_flag}, tied after tie_weights()={plain_tied}")

    model, _ = load_model_and_processor(str(folder))
    assert not model.config.tie_word_embeddings and not model.config.text_config.tie_word_embeddings
    model.tie_weights()  # must be a no-op now
    lm_head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(lm_head, saved_lm_head) and not _same_storage(lm_head, embed)

    # A save from our loader reloads untied with plain from_pretrained too (the wrong flag is not carried on).
    model.save_pretrained(tmp_path / "resaved")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "resaved")
    assert not again.config.tie_word_embeddings
    assert torch.equal(again.get_output_embeddings().weight, saved_lm_head)


def test_tied_model_reloads_tied(tied_dir: Path) -> None:
    with safe_open(str(tied_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model, _ = load_model_and_processor(str(tied_dir))
    assert model.config.tie_word_embeddings
    assert _same_storage(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


def test_untied_config_without_lm_head_fails_loudly(tied_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tied_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no lm_head.weight"):
        load_model_and_processor(str(folder))


def test_bad_paths_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_and_processor(str(tmp_path))


def test_builder_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a")
    build_tiny_model(tmp_path / "b", charset=CHARSET, seed=3)
    build_tiny_model(tmp_path / "c", charset=CHARSET, seed=4)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()


def test_release_like_from_the_command_line_writes_the_release_tokenizer_model(tmp_path: Path) -> None:
    # The release ships tokenizer.model, and export_model.py --gguf needs it: the CLI fixture once had none.
    from tools.make_tiny_model import build_release_like

    assert main(["--out", str(tmp_path / "cli"), "--release_like", "v1"]) == 0
    build_release_like(tmp_path / "api", "v1", sentencepiece_model=True)
    cli, api = ((tmp_path / d / "tokenizer.model").read_bytes() for d in ("cli", "api"))
    assert cli == api
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api", "cli"]  # no staging folder left


def test_a_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import errno

    import tools.make_tiny_model as make_tiny_model

    def half_then_full_disk(out: Path, **kwargs) -> None:
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "model.safetensors"))

    monkeypatch.setattr(make_tiny_model, "build_tiny_model", half_then_full_disk)
    assert main(["--out", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the model folder nor its staging


def test_existing_out_is_kept_and_filled_from_inside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing --out (a Docker volume: a mount point) was filled by os.replace() from a staging folder
    beside it, on another file system there ("Invalid cross-device link"): stage inside it instead."""
    import tools.make_tiny_model as make_tiny_model

    staged: list[Path] = []
    build = make_tiny_model.build_tiny_model

    def build_and_record(out: Path, **kwargs) -> Path:
        staged.append(Path(out))
        return build(out, **kwargs)

    monkeypatch.setattr(make_tiny_model, "build_tiny_model", build_and_record)
    out = tmp_path / "volume"
    out.mkdir()
    inode = out.stat().st_ino
    assert main(["--out", str(out)]) == 0
    assert [p.parent for p in staged] == [out]  # same file system as --out, whatever is mounted where
    assert out.stat().st_ino == inode and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"] and not (out / ".partial").exists()
