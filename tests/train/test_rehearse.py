"""The rehearsal (train.sh --rehearse, REHEARSE=1): every stage of the full run on a sample, the forecast, and
a failure named by its stage."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from launch import TRAIN_SH, free_port, train_env

import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.checkpoints as sft_checkpoints
import paddleocr_vl_manga.train.run as sft
import paddleocr_vl_manga.train.trainer as sft_trainer
from paddleocr_vl_manga.data.dataset import OCRDataset
from paddleocr_vl_manga.data.lengths import sequence_lengths
from paddleocr_vl_manga.model.loading import load_config_and_processor
from paddleocr_vl_manga.train.rehearsal import KILLED_AT, STEPS

# batch 2 x accumulation 2 (train_env), CER on 4 crops at every evaluation, two loader workers
ENV = {"NUM_WORKERS": "2", "EVAL_GENERATION_SAMPLES": "4", "OMP_NUM_THREADS": "1"}
EXTRA = ["--disable_tqdm", "true", "--generation_max_new_tokens", "8"]


def rehearse(tiny_model: Path, data: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TRAIN_SH, *args, *EXTRA], env=train_env(tiny_model, data, out, **{**ENV, **env}),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_stages(rehearsal: Path) -> dict:
    """Every stage ran in order: trainer 1 ran steps 1-2 and stopped at its checkpoint, trainer 2 started
    from that checkpoint's step (Trainer's own state) and ran the rest, CER was decoded at step 1, the best
    checkpoint was loaded and the final model exported."""
    result = json.loads((rehearsal / "rehearsal.json").read_text())
    done, got = result["rehearsal"], result["measured"]
    assert done["start_steps"] == [0, KILLED_AT]  # a fresh second trainer would start at 0 ...
    assert [step for step, _ in got["steps"]] == list(range(1, STEPS + 1))  # ... and run steps 1-2 again
    assert Path(done["resumed_from"]).name == f"checkpoint-{KILLED_AT}"
    assert [e[0] for e in got["evals"]] == list(range(STEPS + 1))  # the base at 0, then every step
    assert got["evals"][1][2] > 0  # seconds of CER generation at step 1
    assert [s for s, _ in got["saves"]] == list(range(1, STEPS + 1))
    assert done["best_loaded"] and Path(done["best_loaded"]).name.startswith("checkpoint-")
    assert (rehearsal / "model.safetensors").is_file() and (rehearsal / "config.json").is_file()
    assert not list(rehearsal.glob("checkpoint-*"))  # removed: the full run needs the disk
    return result


def test_rehearsal_runs_every_stage_and_forecasts(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = rehearse(tiny_model, prepared, out, "--rehearse")
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rehearsal passed in"))
    summary = "\n".join(lines[start:])

    # the full run, from the full data: 3 epochs of 2-crop batches, 2 accumulated, on one process
    counts = {s: len(OCRDataset(prepared / f"{s}.jsonl")) for s in ("train", "val", "test")}
    steps = 3 * math.ceil(math.ceil(counts["train"] / 2) / 2)
    assert f"full run: {steps:,} optimizer steps (3 epochs of {counts['train']:,} train crops" in summary
    for split, n in counts.items():
        assert f"  {split}: 0 of {n:,} crops over max_length 1,536" in summary
    assert "memory: plan: " in summary and "peak not measured (no CUDA device" in summary
    assert "s per optimizer step (mean of steps 2, 4:" in summary
    assert "projected time of the full run: " in summary and f"= {steps:,} steps x " in summary
    assert f"rehearsal folder: {out / 'rehearsal'}" in summary

    # the full run's folder is untouched: RESUME=auto will not find a rehearsal checkpoint
    assert [p.name for p in out.iterdir()] == ["rehearsal"]
    assert sft_checkpoints.latest_complete_checkpoint(str(out)) is None
    result = check_stages(out / "rehearsal")
    full = result["full_run"]
    assert (full["steps"], full["train_crops"]) == (steps, counts["train"])
    assert (full["batch"], full["accumulation"], full["processes"]) == (2, 2, 1)
    every_4 = steps // 4 + (steps % 4 > 0)  # SAVE_STEPS = EVAL_STEPS = 4, and at the last step
    assert (full["evals"], full["saves"]) == (every_4 + 1, every_4)  # + the base at step 0

    # the sample holds the longest kept train crops first: the peak memory is the worst batch's
    processor = load_config_and_processor(str(tiny_model)).processor
    full_lengths = sequence_lengths(OCRDataset(prepared / "train.jsonl"), processor)
    sample_lengths = sequence_lengths(OCRDataset(out / "rehearsal" / "data" / "train.jsonl"), processor)
    assert len(sample_lengths) == 2 * 2 * STEPS
    assert sample_lengths[:2] == sorted(full_lengths, reverse=True)[:2]


def test_lora_rehearsal_checkpoints_the_adapter_and_merges(
    tiny_model: Path, prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rehearse(tiny_model, prepared, out, LORA_R="4", REHEARSE="1")  # the train.sh variable
    result = check_stages(out / "rehearsal")
    # the checkpoint it resumed from held the adapter only; the end merged it into a plain model
    assert "adapter_model.safetensors" in result["rehearsal"]["checkpoint_files"]
    assert "model.safetensors" not in result["rehearsal"]["checkpoint_files"]
    assert (out / "rehearsal" / "adapter" / "adapter_model.safetensors").is_file()


def test_ddp_rehearsal_prints_once(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    """Two processes (gloo): both rehearse every stage, rank 0 alone prints, the forecast counts both."""
    out = tmp_path / "out"
    proc = rehearse(tiny_model, prepared, out, "--rehearse", NUM_GPUS="2", GRAD_ACCUM="1", NUM_WORKERS="0",
                    MASTER_PORT=str(free_port()))
    assert proc.stdout.count("rehearsal passed in") == 1 and "rehearsal failed" not in proc.stderr
    steps = 3 * math.ceil(math.ceil(len(OCRDataset(prepared / "train.jsonl")) / 2) / 2)  # 2 crops x 2 ranks
    assert f"full run: {steps:,} optimizer steps" in proc.stdout
    assert "batch 2 x accumulation 1 x 2 processes = 4 crops a step" in proc.stdout
    check_stages(out / "rehearsal")
    assert len(OCRDataset(out / "rehearsal" / "data" / "train.jsonl")) == 2 * 2 * STEPS  # both ranks' steps


def in_process(tiny_model: Path, data: Path, out: Path) -> list[str]:
    """train.sh's evaluation and best-model settings, loader workers off (this is pytest's process)."""
    return ["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--eval_generation_samples", "4",
            "--generation_max_new_tokens", "8", "--eval_strategy", "steps", "--save_strategy", "steps",
            "--eval_steps", "4", "--save_steps", "4", "--load_best_model_at_end", "true",
            "--metric_for_best_model", "cer", "--greater_is_better", "false", "--rehearse", "true"]


@pytest.mark.parametrize("stage", ["export", "evaluation"])
def test_a_failure_names_its_stage(
    tiny_model: Path, prepared: Path, tmp_path: Path, monkeypatch, error_line, stage: str
) -> None:
    if stage == "export":
        def export(*args, **kwargs):
            raise sft_build.ExportError("the base's key layout is unknown")

        monkeypatch.setattr(sft_build, "export_model", export)
        want = "rehearsal failed at export: could not lay out"
    else:  # CER generation fails after the first update, not on the base
        calls = []

        def generate(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("CUDA out of memory (simulated)")
            return [""] * len(args[2])

        monkeypatch.setattr(sft_trainer, "generate_texts", generate)
        want = "rehearsal failed at evaluation (CER generation) at step 1: RuntimeError: CUDA out of memory"
    out = tmp_path / "out"
    line = error_line(sft.main(in_process(tiny_model, prepared, out)))
    assert line.startswith(f"error: {want}"), line
    assert stage != "export" or "the base's key layout is unknown" in line
    note = out / "rehearsal" / "rehearsal_error.txt"
    assert f"(traceback: {note})" in line and "Traceback" in note.read_text()
    assert not (out / "rehearsal" / "model.safetensors").exists() or stage == "export"
    assert sft_checkpoints.latest_complete_checkpoint(str(out)) is None
    assert not list((out / "rehearsal").glob("checkpoint-*"))  # a failed rehearsal frees its disk too
