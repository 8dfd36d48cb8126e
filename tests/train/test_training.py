"""Collator labels, loss normalization, and training that provably learns (tiny model, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import StopAt, subset, train_args
from transformers import TrainerCallback

import paddleocr_vl_manga.data.collator as custom_collator
import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.inputs as sft_inputs
import paddleocr_vl_manga.train.run as sft
import paddleocr_vl_manga.train.trainer as sft_trainer
from paddleocr_vl_manga.data.collator import OCRCollator, OverlongError, PromptError
from paddleocr_vl_manga.data.dataset import OCRDataset, load_image
from paddleocr_vl_manga.data.lengths import sequence_lengths
from paddleocr_vl_manga.model.generation import generate_texts
from paddleocr_vl_manga.model.loading import load_model_and_processor


@pytest.fixture(scope="module")
def processor(tiny_model: Path):
    return load_model_and_processor(str(tiny_model))[1]


def examples(prepared: Path, texts: list[str]) -> list[dict]:
    ds = OCRDataset(prepared / "train.jsonl")
    return [{**ds[i], "text": t, "id": i} for i, t in enumerate(texts)]


# ---------------------------------------------------------------- collator


def test_labels_cover_exactly_answer_and_eos(prepared: Path, processor) -> None:
    texts = ["あ", "魔王様！行くぞ！", "ＯＫ、１２３", "「ドキドキ」…ー"]
    batch = OCRCollator(processor, pad_to_multiple_of=8)(examples(prepared, texts))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] % 8 == 0 and (mask[:, -1] == 0).any()  # right padding happened
    eos = processor.tokenizer.eos_token_id
    for row, text in enumerate(texts):
        answer = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        labelled = (labels[row] != -100).nonzero().squeeze(1)
        n = int(mask[row].sum())
        # A contiguous run ending at the last real token, equal to the answer + eos ...
        assert labelled.tolist() == list(range(n - len(answer), n))
        assert labels[row, labelled].tolist() == answer == ids[row, labelled].tolist()
        # ... and nothing on the prompt, the image tokens or the padding.
        assert (labels[row, : n - len(answer)] == -100).all() and (labels[row, n:] == -100).all()
    for key in ("mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert key in batch


def test_template_without_generation_prompt_raises(processor) -> None:
    import copy

    broken = copy.deepcopy(processor)
    # The template ignores add_generation_prompt: no "Assistant: " for the answer to follow.
    broken.chat_template = (
        "<|begin_of_sentence|>{% for m in messages %}{% if m.role == 'assistant' %}Assistant: "
        "{{ m.content[0].text }}</s>{% else %}User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>OCR:\n"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(PromptError, match=r"renders the generation prompt as .*OCR:\\n';"):
        OCRCollator(broken)
    broken.chat_template = "{{ messages[0].content.text.upper() }}"  # fails to render at all
    with pytest.raises(PromptError, match="cannot render a generation prompt"):
        OCRCollator(broken)


def test_overlong_sample_dropped_or_raises(prepared: Path, processor) -> None:
    exs = examples(prepared, ["あ", "とても長いテキストとても長いテキスト"])
    full = OCRCollator(processor, max_length=None)(exs)
    lengths = full["attention_mask"].sum(1).tolist()
    limit = min(lengths)  # the shorter sample fits exactly, the longer one doesn't
    assert max(lengths) > limit
    collator = OCRCollator(processor, max_length=limit)
    batch = collator(exs)
    keep = lengths.index(limit)
    assert collator.num_dropped == 1 and batch["input_ids"].shape == (1, limit)
    assert torch.equal(batch["input_ids"][0], full["input_ids"][keep, :limit])
    patches = int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["pixel_values"].shape[0] == patches
    with pytest.raises(OverlongError):
        OCRCollator(processor, max_length=limit, on_overlong="error")(exs)
    with pytest.raises(OverlongError, match="every sample"):
        OCRCollator(processor, max_length=limit - 1)(exs)


def test_sequence_lengths_match_collator(prepared: Path, processor) -> None:
    ds = OCRDataset(prepared / "train.jsonl", max_samples=12)
    est = sequence_lengths(ds, processor)
    batch = OCRCollator(processor, max_length=None)([ds[i] for i in range(len(ds))])
    assert est == batch["attention_mask"].sum(1).tolist()


# ---------------------------------------------------------------- loss


def make_trainer(tiny_model: Path, prepared: Path, tmp_path: Path) -> sft_trainer.BF16Trainer:
    args = train_args(tiny_model, subset(prepared, tmp_path / "d", 4), tmp_path / "o")
    return sft_build.build_trainer(*args)


def test_loss_equals_plain_computation(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model, prepared, tmp_path)
    model, collator = trainer.model, trainer.data_collator
    batch = collator(examples(prepared, ["あいう", "魔王様！行くぞ！", "x"]))
    # HF: full logits everywhere, its own rope positions, mean over answer tokens
    plain = model(**{k: v for k, v in batch.items() if k not in ("logits_to_keep", "position_ids")}).loss
    ours = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-6)


def test_token_weighted_loss_across_micro_batches(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model, prepared, tmp_path)
    model, collator = trainer.model, trainer.data_collator
    exs = examples(prepared, ["あ", "とても長いテキストとても長い"])  # 2 vs 15 answer tokens
    whole = collator(exs)
    parts = [collator([e]) for e in exs]
    n_items = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)

    def grads(batches) -> list[torch.Tensor]:
        model.zero_grad()
        for b in batches:
            trainer.compute_loss(model, dict(b), num_items_in_batch=n_items).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one, two = grads([whole]), grads(parts)
    assert len(one) == len(two) > 10
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A per-micro-batch mean (the seed's normalization) would weight the 2-token answer like the 15-token one.
    model.zero_grad()
    seed_style = sum(trainer.compute_loss(model, dict(b)) for b in parts) / 2
    seed_style.backward()
    seed_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(one, seed_grads, strict=True))


def test_nonfinite_loss_stops_with_step(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model, prepared, tmp_path)
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(sft_trainer.NonFiniteLossError, match="at step 0"):
        trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples(prepared, ["あ"]))))


# Tensor methods that copy a device value to the host, stalling the GPU until it is computed
SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def test_training_step_has_no_host_sync_in_our_code(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward, loss and backward of one micro-batch: no sync called from sft's code (answer_loss,
    compute_loss, the NaN guard) or custom_collator's (the collator itself syncs freely: it runs in the loader
    workers, before the step). Syncs inside transformers and torch are theirs; only our frames are checked."""
    trainer = make_trainer(tiny_model, prepared, tmp_path)
    batch = trainer.data_collator(examples(prepared, ["あいう", "魔王様！行くぞ！", "x"]))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    ours = {sft_trainer.__file__, custom_collator.__file__}  # answer_loss, compute_loss; the collator
    calls: list[tuple[str, int, str]] = []

    def spy(name: str):
        real = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename in ours:
                calls.append((Path(caller.f_code.co_filename).name, caller.f_lineno, name))
            return real(self, *args, **kwargs)

        return method

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    try:
        loss = trainer.training_step(trainer.model, batch, num_items_in_batch=n_items)
    finally:
        monkeypatch.undo()
    assert calls == []
    assert torch.isfinite(loss)


class PoisonAfter(TrainerCallback):
    """Fills lm_head with NaN at the end of optimizer step `step`: every later loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))


def test_nan_loss_stops_before_the_next_checkpoint(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    """The NaN is only recorded on the device when it happens (step 3); the check before saving checkpoint-4
    stops the run, naming step 3."""
    out = tmp_path / "o"
    trainer = sft_build.build_trainer(*train_args(
        tiny_model, subset(prepared, tmp_path / "d", 8), out, "--max_steps", "8",
        "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--logging_steps", "100",
    ), callbacks=[PoisonAfter(3)])
    nan = r"^loss is nan at step 3 \(epoch [0-9.]+\); stopping"
    with pytest.raises(sft_trainer.NonFiniteLossError, match=nan):
        trainer.train()
    assert trainer.state.global_step == 4  # it ran on to the check ...
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # ... which came before the save


def test_nan_inf_filter_off_unless_asked(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    """The Trainer's filter reads each step's loss on the host; the NaN guard makes it redundant."""
    assert not train_args(tiny_model, prepared, tmp_path)[2].logging_nan_inf_filter
    asked = train_args(tiny_model, prepared, tmp_path, "--logging_nan_inf_filter", "true")[2]
    assert asked.logging_nan_inf_filter


def test_lean_optimizer_keeps_small_updates() -> None:
    """Why bf16_lean uses Kahan summation: plain AdamW on bf16 weights rounds lr-1e-5 steps away."""
    def run(opt_cls, **kw) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = opt_cls([p], weight_decay=0.0, **kw)
        for _ in range(1000):
            p.grad = torch.ones_like(p)
            opt.step()
        return p, opt

    p, _ = run(torch.optim.AdamW, lr=1e-5)
    assert (p == 1.0).all()  # every one of the 1000 updates was rounded away
    lean_cls, lean_kwargs = sft_trainer.lean_optimizer(1e-5)  # what --precision bf16_lean trains with
    p, opt = run(lean_cls, **lean_kwargs)
    # The bf16 weight moved to within one bf16 step (2**-8 below 1.0) of the true 0.99 ...
    assert p.float().mean().item() == pytest.approx(0.99, abs=2**-8)
    # ... and weight + (bf16) compensation buffer hold the sum to ~0.1 % of the 0.01 total change.
    exact = p.float() + opt.state[p]["kahan_comp"].float()
    assert exact.mean().item() == pytest.approx(0.99, abs=2e-3)


# ---------------------------------------------------------------- training


def test_overfit_16_crops_then_reload(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    data = subset(prepared, tmp_path / "d", 16)
    out = tmp_path / "out"
    trainer = sft_build.build_trainer(*train_args(
        tiny_model, data, out, "--max_steps", "300", "--per_device_train_batch_size", "16",
        "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "10",
        "--save_strategy", "no",
    ))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.05 < losses[0]
    records = trainer.train_dataset.records
    images = [load_image(r, "train") for r in records]
    preds = generate_texts(trainer.model, trainer.processing_class, images, batch_size=16, max_new_tokens=24)
    exact = sum(p == r["text"] for p, r in zip(preds, records, strict=True))
    assert exact >= 15, list(zip(preds, [r["text"] for r in records], strict=True))

    trainer.save_model(str(out))
    model, processor = load_model_and_processor(str(out))
    assert torch.equal(model.lm_head.weight, trainer.model.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    assert generate_texts(model, processor, images, batch_size=4, max_new_tokens=24) == preds


@pytest.mark.parametrize("grouping", ["false", "true"])
def test_resume_gives_same_weights(tiny_model: Path, prepared: Path, tmp_path: Path, grouping: str) -> None:
    data = subset(prepared, tmp_path / "d", 12)
    common = ["--max_steps", "8", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", "4",
              "--group_by_length", grouping]
    straight = sft_build.build_trainer(*train_args(tiny_model, data, tmp_path / "a", *common))
    straight.train()

    args_b = train_args(tiny_model, data, tmp_path / "b", *common)
    interrupted = sft_build.build_trainer(*args_b, callbacks=[StopAt(4)])
    interrupted.train()
    assert interrupted.state.global_step == 4 and (tmp_path / "b" / "checkpoint-4").is_dir()
    m, d, a = train_args(tiny_model, data, tmp_path / "b", *common, "--resume_from_checkpoint", "auto")
    resumed = sft_build.build_trainer(m, d, a)
    assert a.resume_from_checkpoint.endswith("checkpoint-4")
    resumed.train(resume_from_checkpoint=a.resume_from_checkpoint)
    assert resumed.state.global_step == straight.state.global_step == 8
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_generation_metrics_same_with_loader_workers(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Training-time CER decodes its crops in --dataloader_num_workers processes; the texts do not change."""
    trainer = sft_build.build_trainer(*train_args(
        tiny_model, prepared, tmp_path / "out", "--max_steps", "1", "--eval_generation_samples", "7",
        "--generation_batch_size", "2", "--generation_max_new_tokens", "6"))
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["num_workers"], generate_texts(*args, **kwargs)))
        return seen[-1][1]

    monkeypatch.setattr(sft_trainer, "generate_texts", spy)
    metrics = []
    for workers in (0, 2):
        trainer.args.dataloader_num_workers = workers
        metrics.append(trainer.generation_metrics())
    assert [w for w, _ in seen] == [0, 2] and seen[0][1] == seen[1][1] and metrics[0] == metrics[1]
    images = [load_image(r, "val") for r in trainer.gen_dataset.records]
    assert seen[0][1] == generate_texts(trainer.model, trainer.processing_class, images, max_new_tokens=6)


# ---------------------------------------------------------------- units, reruns, versions


def test_cer_is_logged_in_percent_and_labelled(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate_model.py and the docs give CER in percent; training's eval_cer, its curves and its
    best-checkpoint line used fractions (`eval_cer 0.9924`, `val cer (119.9911)`)."""
    from paddleocr_vl_manga.evaluate.metrics import cer_metrics

    trainer = sft_build.build_trainer(*train_args(tiny_model, prepared, tmp_path / "out", "--max_steps", "1",
                                            "--eval_generation_samples", "5"))
    refs = [r["text"] for r in trainer.gen_dataset.records]
    preds = [t[:-1] if i % 2 else t for i, t in enumerate(refs)]  # every other crop misses its last character
    monkeypatch.setattr(sft_trainer, "generate_texts", lambda *a, **k: list(preds))
    got = trainer.generation_metrics()
    want = cer_metrics(preds, refs, "none")
    assert got["cer"] == pytest.approx(100 * want["cer"]) and 0 < got["cer"] < 100
    assert got["exact_match"] == pytest.approx(100 * want["exact_match"])
    assert sft_trainer.metric_text("cer", got["cer"]) == f"val CER {100 * want['cer']:.2f} %"
    assert sft_trainer.metric_text("loss", 0.25) == "val loss 0.2500"
    fig = sft_build.curves_figure([{"step": 0, "eval_loss": 2.0, "eval_cer": got["cer"]},
                                   {"step": 1, "loss": 1.0}])
    assert "%" in fig.axes[1].get_ylabel()


def test_checkpoint_from_before_percent_cer_resumes_in_percent(tiny_model: Path, prepared: Path,
                                                              tmp_path: Path) -> None:
    """A checkpoint written while CER was logged as a fraction holds best_metric 0.15 (15 %): resumed with
    RESUME=auto, no new CER in percent (14.0) ever beat it, so load_best_model_at_end loaded the older, worse
    checkpoint and SAVE_TOTAL_LIMIT rotated out the better ones."""
    from transformers import TrainerState

    trainer = sft_build.build_trainer(*train_args(tiny_model, prepared, tmp_path / "out", "--max_steps", "1"))
    units = next(c for c in trainer.callback_handler.callbacks if isinstance(c, sft_trainer.PercentMetrics))
    old = TrainerState(best_metric=0.15, best_model_checkpoint="out/checkpoint-4", log_history=[
        {"step": 0, "eval_loss": 2.0, "eval_cer": 0.6, "eval_exact_match": 0.1},
        {"step": 4, "eval_loss": 1.0, "eval_cer": 0.15, "eval_exact_match": 0.5}])
    units.on_train_begin(trainer.args, old, trainer.control)
    assert old.best_metric == pytest.approx(15.0)
    assert [(h["eval_cer"], h["eval_exact_match"], h["eval_loss"]) for h in old.log_history] == [
        pytest.approx((60.0, 10.0, 2.0)), pytest.approx((15.0, 50.0, 1.0))]
    # what this version saves is marked as percent and resumes unchanged
    old.save_to_json(tmp_path / "trainer_state.json")
    again = TrainerState.load_from_json(tmp_path / "trainer_state.json")
    units.on_train_begin(trainer.args, again, trainer.control)
    assert again.best_metric == pytest.approx(15.0)
    assert again.log_history[1]["eval_cer"] == pytest.approx(15.0)


def test_rerun_of_a_run_finished_before_percent_cer_gives_its_best_in_percent(tmp_path: Path) -> None:
    """A run finished while CER was a fraction holds best_metric 0.15: the rerun's line said `val CER 0.15 %`
    for a CER of 15 %."""
    out, checkpoint = tmp_path / "out", tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (out / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "best_metric": 0.15, "best_model_checkpoint": str(checkpoint)}))
    _, _, args = sft_arguments.parse_args(["--output_dir", str(out), "--max_steps", "2",
                                           "--resume_from_checkpoint", str(checkpoint),
                                           "--metric_for_best_model", "cer", "--report_to", "none"])
    said = sft_build.finished_run(args, 8)
    assert said and "the best by val CER 15.00 %" in said, said


def test_rerun_of_a_finished_run_says_so_and_loads_nothing(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """It used to print `resume: .../checkpoint-N`, load the model, and log `train_runtime 0.0005`,
    `train_loss 0`."""
    data, out = subset(prepared, tmp_path / "d", 8), tmp_path / "out"
    argv = ["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out), "--report_to",
            "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "2", "--save_steps", "2",
            "--eval_strategy", "no", "--resume_from_checkpoint", "auto", "--dataloader_num_workers", "0"]
    assert sft.main([*argv, "--max_steps", "2"]) == 0
    model_file = out / "model.safetensors"
    written = model_file.stat().st_mtime_ns
    capsys.readouterr()

    real_load = sft_build.load_model_and_processor
    monkeypatch.setattr(sft_build, "load_model_and_processor",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    assert sft.main([*argv, "--max_steps", "2"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("the run is already complete at step 2 of 2"), said
    assert str(out) in said[0] and model_file.stat().st_mtime_ns == written

    # a longer schedule is not complete: it trains on from the last checkpoint
    monkeypatch.setattr(sft_build, "load_model_and_processor", real_load)
    assert sft.main([*argv, "--max_steps", "4"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_rerun_of_a_finished_run_with_an_unreadable_crop_says_so(
    tiny_model: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The finished-run check counts steps before the crops are decoded: 9 crops make 5 steps of batch 2, the
    8 readable ones 4, so the rerun of the finished 4-step run loaded the model and logged `train_runtime`
    again."""
    data, out = subset(prepared, tmp_path / "d", 9), tmp_path / "out"
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    broken = tmp_path / "truncated.png"
    broken.write_bytes(Path(records[-1]["image"]).read_bytes()[:100])
    records[-1]["image"] = str(broken)
    (data / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    argv = ["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out), "--report_to",
            "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "2", "--save_steps", "2",
            "--eval_strategy", "no", "--resume_from_checkpoint", "auto", "--dataloader_num_workers", "0",
            "--num_train_epochs", "1"]
    assert sft.main(argv) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    capsys.readouterr()

    monkeypatch.setattr(sft_build, "load_model_and_processor",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    assert sft.main(argv) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("the run is already complete at step 4 of 4"), said


def test_our_arguments_raise_no_deprecation_warning(tmp_path: Path) -> None:
    """transformers 5.23+ warns that --gradient_checkpointing goes in v6 (activation_checkpointing); 5.18-5.22
    know only the old name. train.sh passes the old one: both must work, the newer without a warning."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, _, args = sft_arguments.parse_args(["--output_dir", str(tmp_path), "--gradient_checkpointing",
                                               "true", "--report_to", "none"])
        _, _, off = sft_arguments.parse_args(["--output_dir", str(tmp_path),
                                              "--gradient_checkpointing=false"])
    ours = [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not ours, [str(w.message) for w in ours]
    assert sft_arguments.activation_checkpointing(args) and not sft_arguments.activation_checkpointing(off)


def test_truncated_crop_is_found_before_training_even_in_a_short_run(
    tiny_model: Path, prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated PNG used to surface only when its batch came up (step 3 of a demo run, hours into a real
    one), and a `--max_steps 2` run ended 0 without noticing it. Now every train and val crop is decoded
    first: an unreadable one is left out, counted and named, and the run goes on."""
    import logging
    import shutil

    data = subset(prepared, tmp_path / "d", 8)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    broken = tmp_path / "truncated.png"
    shutil.copy(records[-1]["image"], broken)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a copy cut off halfway
    records[-1]["image"] = str(broken)
    (data / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    assert sft_inputs.unreadable(str(broken)) and sft_inputs.unreadable(records[0]["image"]) is None

    caplog.set_level(logging.INFO, logger="sft")
    rc = sft.main(["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir",
                   str(tmp_path / "o"), "--max_steps", "2", "--per_device_train_batch_size", "2",
                   "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
                   "--disable_tqdm", "true"])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "decoded" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("train: 1 of 8 crops cannot be decoded"), warned
    assert f"train.jsonl:{len(records)}" in warned[0] and str(broken) in warned[0]


def test_ranks_share_the_crop_decoding_and_agree_on_what_is_left_out(prepared: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank used to decode every crop (Manga109s' 150k, 8 times over on an 8-GPU node) and decide
    alone: a crop that one rank alone could not read (a node's own copy of the data, a network file system's
    hiccup) left the ranks with different datasets, which DDP's sampler shards by index and length."""
    ds = OCRDataset(subset(prepared, tmp_path / "d", 8) / "train.jsonl")
    decoded: list[str] = []
    monkeypatch.setattr(sft_inputs, "unreadable", lambda path: decoded.append(path))  # reads all it decodes
    rank0 = ["image file is truncated", None, None, None]  # rank 0's verdict on crops 0, 2, 4, 6

    def all_gather_object(shares: list, mine: list) -> None:
        shares[:] = [rank0, mine]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    keep = sft_inputs.readable("train", ds, rank=1, world=2)
    assert decoded == [r["image_path"] for r in ds.records[1::2]]  # its own share only
    assert keep == [False] + [True] * 7  # rank 0's finding too: every rank keeps the same crops
