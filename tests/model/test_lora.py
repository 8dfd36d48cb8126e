"""LoRA training (--lora_r): the merged output, the adapter beside it, resume, and both precisions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import StopAt, subset, train_args
from transformers import AutoModelForImageTextToText

import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.run as sft
from paddleocr_vl_manga.data.dataset import OCRDataset, load_image
from paddleocr_vl_manga.model.generation import generate_texts
from paddleocr_vl_manga.model.loading import load_model_and_processor
from paddleocr_vl_manga.model.lora import TARGET_GROUPS, LoraError, add_lora

R = 4
LORA = ["--lora_r", str(R), "--lora_alpha", "8", "--lora_dropout", "0"]


def cli(tiny_model: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_path", str(tiny_model), "--data_dir", str(data_dir), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0",
            "--logging_steps", "5", *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_model: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run on the language model and projector, with checkpointing and CER at each eval."""
    tmp = tmp_path_factory.mktemp("lora")
    data = subset(prepared, tmp / "d", 16)
    (data / "val.jsonl").write_text((data / "train.jsonl").read_text())  # CER on crops it trains on
    out = tmp / "out"
    argv = cli(
        tiny_model, data, out, *LORA, "--lora_targets", "language,projector", "--max_steps", "60",
        "--per_device_train_batch_size", "16", "--learning_rate", "2e-2", "--warmup_steps", "5",
        "--gradient_checkpointing", "true", "--eval_strategy", "steps", "--eval_steps", "30",
        "--save_strategy", "steps", "--save_steps", "30", "--eval_generation_samples", "4",
        "--generation_max_new_tokens", "8", "--load_best_model_at_end", "true",
    )
    assert sft.main(argv) == 0
    return out


def test_merged_model_is_base_plus_low_rank(lora_run: Path, tiny_model: Path) -> None:
    # loaded, so that names are module names (the files hold the release's key layout)
    base = load_model_and_processor(str(tiny_model))[0].state_dict()
    merged = load_model_and_processor(str(lora_run))[0].state_dict()
    assert merged.keys() == base.keys()
    pattern = "|".join(TARGET_GROUPS[g] for g in ("language", "projector"))
    changed = 0
    for name, w in base.items():
        if not re.fullmatch(pattern, name.removesuffix(".weight")):
            assert torch.equal(merged[name], w), f"{name} is not adapted but changed"
            continue
        delta = (merged[name].double() - w.double())
        s = torch.linalg.svdvals(delta)
        assert s[0] > 1e-4, f"{name} did not move"
        assert (s[R:] <= 1e-4 * s[0]).all(), f"{name}: update has rank > {R}: {s[: R + 2].tolist()}"
        changed += 1
    # 2 decoder layers x 7 projections + 2 projector layers in the tiny model
    assert changed == 16


def test_adapter_is_kept_and_reproduces_the_merge(lora_run: Path, tiny_model: Path, prepared: Path) -> None:
    from peft import PeftModel

    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == 8
    merged, processor = load_model_and_processor(str(lora_run))
    base, _ = load_model_and_processor(str(tiny_model))
    with_adapter = PeftModel.from_pretrained(base, str(lora_run / "adapter"))
    ds = OCRDataset(prepared / "train.jsonl", max_samples=8)
    images = [load_image(r, ds.path) for r in ds.records]
    kw = {"batch_size": 8, "max_new_tokens": 8}
    want = generate_texts(merged, processor, images, **kw)
    assert generate_texts(with_adapter, processor, images, **kw) == want
    AutoModelForImageTextToText.from_pretrained(str(lora_run))  # a plain checkpoint, no PEFT needed


def test_lora_loss_falls_and_cer_is_logged(lora_run: Path) -> None:
    state = json.loads((lora_run / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    # The tiny model's lm_head and embeddings are random and frozen, so adapters learn slowly (full
    # fine-tuning reaches 0.3 in these steps); with no adapter training the loss would not move at all (the
    # one batch is the whole train set).
    assert losses[-1] < losses[0] - 0.25, losses
    assert [h["step"] for h in state["log_history"] if "eval_cer" in h] == [0, 30, 60]  # 0: the base
    # checkpoints hold the adapter only
    ckpt = Path(state["best_model_checkpoint"])
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()


@pytest.mark.parametrize("precision", ["fp32_master", "bf16_lean"])
def test_lora_resume_gives_same_adapter(
    tiny_model: Path, prepared: Path, tmp_path: Path, precision: str
) -> None:
    """Stopped at step 4 and resumed from its checkpoint = uninterrupted, in both precisions (bf16_lean
    keeps the base in bf16 and the adapters in fp32, stepped by Trainer's AdamW)."""
    data = subset(prepared, tmp_path / "d", 12)
    common = [*LORA, "--precision", precision, "--max_steps", "8", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--save_strategy", "steps",
              "--save_steps", "4", "--gradient_checkpointing", "true"]
    straight = sft_build.build_trainer(*train_args(tiny_model, data, tmp_path / "a", *common))
    base = {n: p.detach().clone() for n, p in straight.model.named_parameters() if not p.requires_grad}
    straight.train()
    trained = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert all(torch.equal(p, base[n]) for n, p in straight.model.named_parameters() if n in base)
    want_dtype = torch.bfloat16 if precision == "bf16_lean" else torch.float32
    assert {p.dtype for n, p in straight.model.named_parameters() if n in base} == {want_dtype}

    args_b = train_args(tiny_model, data, tmp_path / "b", *common)
    interrupted = sft_build.build_trainer(*args_b, callbacks=[StopAt(4)])
    interrupted.train()
    m, d, a = train_args(tiny_model, data, tmp_path / "b", *common, "--resume_from_checkpoint", "auto")
    resumed = sft_build.build_trainer(m, d, a)
    assert a.resume_from_checkpoint.endswith("checkpoint-4")
    resumed.train(resume_from_checkpoint=a.resume_from_checkpoint)
    assert resumed.state.global_step == 8
    got = dict(resumed.model.named_parameters())
    for name, p in trained.items():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert max(p.abs().max().item() for n, p in trained.items() if "lora_B" in n) > 1e-3  # B starts at 0


def test_resuming_with_another_rank_fails_clearly(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    data = subset(prepared, tmp_path / "d", 4)
    common = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2", "--lora_dropout", "0"]
    sft_build.build_trainer(*train_args(tiny_model, data, tmp_path / "o", "--lora_r", "4", *common)).train()
    m, d, a = train_args(tiny_model, data, tmp_path / "o", "--lora_r", "8", *common, "--max_steps", "4",
                         "--resume_from_checkpoint", "auto")
    with pytest.raises(LoraError, match="does not fit this model"):
        sft_build.build_trainer(m, d, a).train(resume_from_checkpoint=a.resume_from_checkpoint)


def test_bad_targets_fail_clearly(tiny_model: Path) -> None:
    model = load_model_and_processor(str(tiny_model))[0]
    with pytest.raises(LoraError, match="choose one or more of language, vision, projector"):
        add_lora(model, 4, "language,decoder")
    with pytest.raises(LoraError, match="matches no linear layer"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4, "vision")


def test_adapter_checkpoint_exports_like_the_final_model(lora_run: Path, tiny_model: Path, prepared: Path,
                                                         tmp_path: Path, error_line) -> None:
    """A LoRA checkpoint-N holds the adapter only: export_model merges it into the base; the evaluation
    scripts name the way instead of failing on a missing config.json."""
    import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
    import paddleocr_vl_manga.export.layout as export_model

    best = json.loads((lora_run / "trainer_state.json").read_text())["best_model_checkpoint"]
    out = tmp_path / "exported"
    assert export_model.main([best, "--base", str(tiny_model), "--out", str(out)]) == 0
    final, got = load_file(str(lora_run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert final.keys() == got.keys() and all(torch.equal(final[k], got[k]) for k in final)
    assert not list(out.glob(".merge-*"))
    rc = evaluate_model.main(["--model_path", best, "--data_dir", str(prepared), "--num_samples", "1",
                              "--output_dir", str(tmp_path / "eval")])
    assert "holds a LoRA adapter only" in error_line(rc)


def test_lora_run_and_its_checkpoint_export_keep_the_output_vocabulary(lora_run: Path, tiny_model: Path,
                                                                       tmp_path: Path) -> None:
    """The merged final model (saved outside the trainer) and a merged adapter checkpoint both carry the
    run's label tokens (model/output_vocabulary.py)."""
    import paddleocr_vl_manga.export.layout as export_model
    from paddleocr_vl_manga.model.output_vocabulary import OUTPUT_VOCABULARY_FILE

    final = json.loads((lora_run / OUTPUT_VOCABULARY_FILE).read_text())
    assert final and final == sorted(set(final))
    checkpoint = sorted(lora_run.glob("checkpoint-*"))[0]
    out = tmp_path / "exported"
    assert export_model.main([str(checkpoint), "--base", str(tiny_model), "--out", str(out)]) == 0
    assert json.loads((out / OUTPUT_VOCABULARY_FILE).read_text()) == final
