"""Faults a long run must survive: kill -9 and resume, NaN loss, unusable output folder (DDP: see
test_distributed.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, TRAIN_SH, assert_same_weights, final_state, train_env

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.checkpoints as sft_checkpoints
import paddleocr_vl_manga.train.run as sft

TRAIN = [*TRAIN_SH, "--max_steps", "8", "--max_eval_samples", "4", "--load_best_model_at_end", "false",
         "--disable_tqdm", "true"]


def test_kill9_after_checkpoint_then_resume_auto(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    subprocess.run(TRAIN, env=train_env(tiny_model, prepared, straight), check=True, capture_output=True,
                   timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN, env=train_env(tiny_model, prepared, out), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-4" / "trainer_state.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").is_dir() and not (out / "model.safetensors").exists()

    # RESUME defaults to auto in train.sh: rerunning the same command continues from the last checkpoint.
    done = subprocess.run(TRAIN, env=train_env(tiny_model, prepared, out), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resume: " in done.stderr and "checkpoint-" in done.stderr
    want, want_step = final_state(straight)
    got, got_step = final_state(out)
    assert got_step == want_step == 8
    assert_same_weights(got, want)


def test_incomplete_checkpoint_is_skipped(tmp_path: Path) -> None:
    for step, complete in ((4, True), (8, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        if complete:
            (ckpt / "trainer_state.json").write_text("{}")
    assert sft_checkpoints.latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_nan_loss_stops_naming_the_step(tiny_model: Path, prepared: Path, tmp_path: Path, capsys) -> None:
    rc = sft.main(["--model_path", str(tiny_model), "--data_dir", str(prepared), "--output_dir",
                   str(tmp_path / "o"), "--max_steps", "30", "--per_device_train_batch_size", "4",
                   "--learning_rate", "1e6", "--max_grad_norm", "0", "--report_to", "none",
                   "--save_strategy", "no", "--eval_strategy", "no", "--disable_tqdm", "true"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "loss is nan at step" in err or "loss is inf at step" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_unwritable_output_dir_fails_before_work(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, str(REPO / "sft_paddleocr_vl.py"), "--model_path", str(tiny_model), "--data_dir",
         str(prepared), "--output_dir", str(blocker / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "cannot write to output_dir" in proc.stderr and "Traceback" not in proc.stderr


def test_full_disk_fails_before_work(tiny_model: Path, prepared: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    args = sft_arguments.parse_args(["--model_path", str(tiny_model), "--data_dir", str(prepared),
                                     "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    with pytest.raises(SystemExit, match="GiB free but one checkpoint needs"):
        sft_build.build_trainer(*args)


def test_bad_setup_fails_before_loading_the_model(tmp_path: Path, monkeypatch) -> None:
    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(sft_build, "load_model_and_processor", must_not_load)
    args = sft_arguments.parse_args(["--model_path", "PaddlePaddle/PaddleOCR-VL", "--data_dir",
                                     str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"),
                                     "--report_to", "none"])
    with pytest.raises(sft.DatasetError, match="train.jsonl: file not found"):
        sft_build.build_trainer(*args)

    # train.sh run by a Python without torch: one clear line, not a traceback from its GPU probe.
    bare = tmp_path / "bare_python"
    bare.write_text("#!/bin/sh\necho 'ModuleNotFoundError' >&2\nexit 1\n")
    bare.chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "train.sh")], env=dict(os.environ, PYTHON=str(bare)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot import torch and transformers" in proc.stderr, proc.stderr
