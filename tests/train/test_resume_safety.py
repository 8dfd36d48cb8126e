"""Resuming across machines: a checkpoint records its precision, optimizer and batch layout, and a resume
that would silently lose the optimizer state stops first (tiny model, CPU).

The field case: a run started with fp32_master (torch's AdamW) on a large GPU, resumed at home where
PRECISION=auto picks bf16_lean (torch-optimi's AdamW, which re-initialises its moments when it finds no
kahan_comp in a loaded state)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.checkpoints as sft_checkpoints
import paddleocr_vl_manga.train.run as sft

STEPS, SAVE_EVERY = 4, 2


class Watch(TrainerCallback):
    """The lr each optimizer step really uses (the optimizer's, not the scheduler's log) and the weights the
    first step starts from."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.start: torch.Tensor | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]
        if self.start is None:
            self.start = model.lm_head.weight.detach().clone()


def argv(tiny_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0",
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--learning_rate", "3e-3",
            "--lr_scheduler_type", "linear", "--warmup_steps", "1", "--save_strategy", "steps",
            "--save_steps", str(SAVE_EVERY), "--logging_steps", "1", "--eval_strategy", "no", *extra]


@pytest.fixture(scope="module")
def fp32_run(tiny_model: Path, prepared: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Watch]:
    """(data folder, output folder, what its steps used) of a 4-step fp32_master run saved every 2 steps."""
    root = tmp_path_factory.mktemp("fp32_run")
    data = root / "d"
    data.mkdir()
    recs = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()][:8]
    (data / "train.jsonl").write_text("".join(
        json.dumps({**r, "image": str(prepared / r["image"])}, ensure_ascii=False) + "\n" for r in recs))
    watch = Watch()
    args = sft_arguments.parse_args(argv(tiny_model, data, root / "o", "--precision", "fp32_master"))
    trainer = sft_build.build_trainer(*args, callbacks=[watch])
    trainer.train()
    return data, root / "o", watch


def run_main(args: list[str]) -> int:
    """sft's exit status as the shell sees it (its pre-training checks exit through SystemExit)."""
    try:
        return sft.main(args)
    except SystemExit as e:
        return e.code


def resumable(fp32_run, tmp_path: Path, step: int = SAVE_EVERY) -> Path:
    """An output folder holding a copy of the fp32 run's checkpoint-`step` only."""
    out = tmp_path / "o"
    shutil.copytree(fp32_run[1] / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


def test_every_checkpoint_records_precision_optimizer_and_layout(fp32_run) -> None:
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        setup = json.loads((fp32_run[1] / f"checkpoint-{step}" / sft_checkpoints.RUN_SETUP_FILE).read_text())
        assert setup["precision"] == "fp32_master" and setup["lora_r"] == 0
        assert setup["optimizer"] == "torch.optim.AdamW" and setup["kahan_sum"] is False
        assert (setup["world_size"], setup["per_device_train_batch_size"],
                setup["gradient_accumulation_steps"]) == (1, 2, 1)


def test_resume_in_bf16_lean_stops_naming_both_settings_and_the_ways_on(
    tiny_model: Path, fp32_run, tmp_path: Path, error_line
) -> None:
    out = resumable(fp32_run, tmp_path)
    rc = run_main(argv(tiny_model, fp32_run[0], out, "--precision", "bf16_lean",
                       "--resume_from_checkpoint", "auto"))
    line = error_line(rc)
    assert "saved by a fp32_master (torch.optim.AdamW) run" in line
    assert "this run is bf16_lean (optimi.AdamW with Kahan summation)" in line
    assert "PRECISION=fp32_master" in line and "--reset_optimizer_on_resume true" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # stopped before anything was written


def test_rehearsal_stops_at_setup_on_the_same_mismatch(tiny_model: Path, fp32_run, tmp_path: Path,
                                                       error_line) -> None:
    out = resumable(fp32_run, tmp_path)
    rc = sft.main(argv(tiny_model, fp32_run[0], out, "--precision", "bf16_lean",
                       "--resume_from_checkpoint", "auto", "--rehearse", "true"))
    line = error_line(rc)
    assert line.startswith("error: rehearsal failed at setup: ResumeMismatch: ")
    assert "fp32_master" in line and "--reset_optimizer_on_resume true" in line


@pytest.mark.parametrize("precision", ["bf16_lean", "fp32_master"])
def test_reset_flag_resumes_weights_and_schedule_with_a_fresh_optimizer(
    tiny_model: Path, fp32_run, tmp_path: Path, caplog: pytest.LogCaptureFixture, precision: str
) -> None:
    """bf16_lean: optimi's AdamW; fp32_master: torch's AdamW, whose saved state would otherwise load."""
    out = resumable(fp32_run, tmp_path)
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"
    watch = Watch()
    with caplog.at_level(logging.WARNING, logger="sft"):
        trainer = sft_build.build_trainer(*sft_arguments.parse_args(argv(
            tiny_model, fp32_run[0], out, "--precision", precision, "--resume_from_checkpoint", "auto",
            "--reset_optimizer_on_resume", "true")), callbacks=[watch])
    fresh = [r.getMessage() for r in caplog.records if "optimizer starts fresh" in r.getMessage()]
    assert len(fresh) == 1
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == STEPS

    # weights: the checkpoint's (in this run's dtype)
    saved = load_file(str(checkpoint / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(watch.start, saved.to(watch.start.dtype))
    # schedule: each resumed step used the lr the uninterrupted run used at that step
    resumed = range(SAVE_EVERY + 1, STEPS + 1)
    assert [watch.lrs[s] for s in resumed] == pytest.approx([fp32_run[2].lrs[s] for s in resumed])
    # optimizer: state from this run's steps only
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    states = [opt.state[p] for g in opt.param_groups for p in g["params"] if p in opt.state]
    assert states and all(s["exp_avg"].abs().sum() > 0 for s in states[:3])
    done = STEPS - SAVE_EVERY
    if precision == "bf16_lean":  # optimi counts steps per group and keeps its Kahan buffers per weight
        assert all(int(g["step"]) == done for g in opt.param_groups)
        assert all(s["kahan_comp"] is not None and s["kahan_comp"].dtype == torch.bfloat16 for s in states)
    else:
        assert all(int(s["step"]) == done for s in states)


def test_changed_world_size_logs_how_steps_map_to_samples(tiny_model: Path, fp32_run, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = resumable(fp32_run, tmp_path)
    record = out / f"checkpoint-{SAVE_EVERY}" / sft_checkpoints.RUN_SETUP_FILE
    record.write_text(json.dumps({**json.loads(record.read_text()), "world_size": 8,
                                  "gradient_accumulation_steps": 4}))
    m, _, a = sft_arguments.parse_args(argv(tiny_model, fp32_run[0], out, "--resume_from_checkpoint",
                                  str(out / f"checkpoint-{SAVE_EVERY}")))
    with caplog.at_level(logging.WARNING, logger="sft"):
        sft_checkpoints.check_resume(a, sft_checkpoints.run_setup(m, a), m.reset_optimizer_on_resume)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "saved by 8 processes x batch 2 x accumulation 4 = 64 crops a step" in line
    assert "this run has 1 process x batch 2 x accumulation 1 = 2" in line
    assert "global step 2 = 2 x 64 = 128 crops seen" in line and "at 2 crops a step" in line


def test_checkpoint_without_record_resumes_as_before_with_one_warning(
    tiny_model: Path, fp32_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = resumable(fp32_run, tmp_path)
    (out / f"checkpoint-{SAVE_EVERY}" / sft_checkpoints.RUN_SETUP_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="sft"):
        m, d, a = sft_arguments.parse_args(argv(tiny_model, fp32_run[0], out, "--resume_from_checkpoint",
                                      str(out / f"checkpoint-{SAVE_EVERY}")))
        sft_checkpoints.check_resume(a, sft_checkpoints.run_setup(m, a), m.reset_optimizer_on_resume)
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"has no {sft_checkpoints.RUN_SETUP_FILE}" in line and "world size is not checked" in line
    assert "optimizer state shows a fp32_master (torch.optim.AdamW) run" in line
    trainer = sft_build.build_trainer(m, d, a)
    trainer.train(resume_from_checkpoint=a.resume_from_checkpoint)
    assert trainer.state.global_step == STEPS
    # its new checkpoints record it
    assert (out / f"checkpoint-{STEPS}" / sft_checkpoints.RUN_SETUP_FILE).is_file()


def test_checkpoint_without_record_in_bf16_lean_stops_by_its_optimizer_state(
    tiny_model: Path, fp32_run, tmp_path: Path, error_line
) -> None:
    """A checkpoint saved before run_setup.json existed, resumed at home: optimi handed torch's AdamW state
    would crash at the first step (KeyError 'kahan_sum'), after minutes of loading."""
    out = resumable(fp32_run, tmp_path)
    (out / f"checkpoint-{SAVE_EVERY}" / sft_checkpoints.RUN_SETUP_FILE).unlink()
    rc = run_main(argv(tiny_model, fp32_run[0], out, "--precision", "bf16_lean",
                       "--resume_from_checkpoint", "auto"))
    line = error_line(rc)
    assert "saved by a fp32_master (torch.optim.AdamW) run" in line
    assert "PRECISION=fp32_master" in line and "--reset_optimizer_on_resume true" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]


@pytest.mark.parametrize("recorded", [True, False])
def test_lora_checkpoint_resumed_as_full_fine_tune_stops_naming_lora_r(
    tiny_model: Path, fp32_run, tmp_path: Path, error_line, recorded: bool
) -> None:
    """LORA_R forgotten at home: no optimizer setting or fresh state can make an adapter fit every weight.
    Without the record (saved before it), the adapter's config says so."""
    out = resumable(fp32_run, tmp_path)
    record = out / f"checkpoint-{SAVE_EVERY}" / sft_checkpoints.RUN_SETUP_FILE
    if recorded:
        record.write_text(json.dumps({**json.loads(record.read_text()), "lora_r": 16}))
    else:
        record.unlink()
        (record.parent / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    for extra in ((), ("--reset_optimizer_on_resume", "true")):
        rc = run_main(argv(tiny_model, fp32_run[0], out, "--precision", "bf16_lean",
                           "--resume_from_checkpoint", "auto", *extra))
        line = error_line(rc)
        assert "saved by a LoRA (--lora_r 16) run" in line and "LORA_R=16" in line
        assert "--optim" not in line


def test_half_written_record_stops_in_one_line(
    tiny_model: Path, fp32_run, tmp_path: Path, error_line
) -> None:
    """A run killed while writing run_setup.json leaves it cut short (RESUME=auto skips that checkpoint: no
    trainer_state.json yet); named by path, it must not end in a traceback."""
    out = resumable(fp32_run, tmp_path)
    checkpoint = out / f"checkpoint-{SAVE_EVERY}"
    record = checkpoint / sft_checkpoints.RUN_SETUP_FILE
    record.write_text(record.read_text()[:40])
    rc = run_main(argv(tiny_model, fp32_run[0], out, "--resume_from_checkpoint", str(checkpoint)))
    line = error_line(rc)
    assert sft_checkpoints.RUN_SETUP_FILE in line and "--resume_from_checkpoint auto" in line
