"""A checkpoint save that runs out of disk or hits a file-size limit: one line naming the file and the cause,
no half-written checkpoint left, and the same command afterwards continues from the last complete one."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
from pathlib import Path

import torch
from launch import TRAIN_SH, train_env

import paddleocr_vl_manga.train.checkpoints as sft_checkpoints
import paddleocr_vl_manga.train.run as sft


def test_full_disk_during_a_save_is_one_line_and_the_rerun_recovers(
    tiny_model: Path, prepared: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["--model_path", str(tiny_model), "--data_dir", str(prepared), "--output_dir", str(out),
            "--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "2", "--eval_strategy",
            "no", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--max_train_samples", "12"]
    real_save = torch.save

    def disk_fills_at_step_4(obj, f, *args, **kwargs):  # as the Trainer looks it up: torch.save
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            Path(f).write_bytes(b"\0" * 100)  # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    assert sft.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert f"could not write {out / 'checkpoint-4' / 'optimizer.pt'}: the disk is full" in errors[0]
    assert str(out / "checkpoint-2") in errors[0]  # where the rerun continues from
    assert not (out / "checkpoint-4").exists()
    assert sft_checkpoints.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command finishes the run
    assert sft.main(argv) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_file_size_limit_during_a_save_is_one_line_and_the_rerun_recovers(tiny_model: Path, prepared: Path,
                                                                          tmp_path: Path) -> None:
    """`ulimit -f` below the weights' size: safetensors' own error (`os error 27`) names no file."""
    out = tmp_path / "out"
    env = train_env(tiny_model, prepared, out, MAX_STEPS="4")
    cmd = [*TRAIN_SH, "--max_train_samples", "8", "--disable_tqdm", "true", "--eval_strategy", "no",
           "--load_best_model_at_end", "false"]
    limit = (tiny_model / "model.safetensors").stat().st_size // 2  # the checkpoint's weights are larger

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    capped = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=cap_file_size)
    assert capped.returncode == 2 and "Traceback" not in capped.stderr, capped.stderr[-3000:]
    errors = [line for line in capped.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, capped.stderr[-3000:]
    assert f"could not write {out / 'checkpoint-4' / 'model.safetensors'}: a file-size limit" in errors[0]
    assert not list(out.glob("checkpoint-*"))

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_full_disk_during_the_final_save_is_one_line_and_the_rerun_saves(
    tiny_model: Path, prepared: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The final model, written after the last checkpoint: one line, no half-written weights, and the same
    command afterwards saves it (it resumes at the last step)."""
    import transformers.modeling_utils as modeling_utils

    out = tmp_path / "out"
    argv = ["--model_path", str(tiny_model), "--data_dir", str(prepared), "--output_dir", str(out),
            "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--eval_strategy",
            "no", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--max_train_samples", "4"]
    real_save = modeling_utils.safe_save_file

    def disk_fills_at_the_end(tensors, filename, *args, **kwargs):  # as save_pretrained looks it up
        if Path(filename).parent == out:
            Path(filename).write_bytes(b"\0" * 100)  # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_fills_at_the_end)
    assert sft.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert f"could not write {out / 'model.safetensors'}: the disk is full" in errors[0]
    assert not (out / "model.safetensors").exists() and (out / "checkpoint-2").is_dir()

    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
    assert sft.main(argv) == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
