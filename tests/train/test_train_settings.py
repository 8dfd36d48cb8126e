"""train.sh's settings are checked before anything loads: one line per bad value (the variable, its value and
what it accepts), and look-alikes of settings in the environment are named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import TRAIN_SH

import paddleocr_vl_manga.train.settings as train_settings


@pytest.fixture
def train_sh(tmp_path: Path):
    """train_sh(**env) -> (return code, stderr, the python commands train.sh started). Its PYTHON passes the
    `python -c "import torch, transformers"` probe at once (no 3-13 s import) and logs every other start."""
    log = tmp_path / "python_starts.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\n'
                       f'[ "$1" = -m ] && echo "$2" >> {log} || echo "$1" >> {log}\n'  # the module after -m
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)

    def run(**extra: str) -> tuple[int, str, list[str]]:
        env = {k: v for k, v in os.environ.items() if k not in train_settings.CHECKS}
        env.update(PYTHON=str(wrapper), OUTPUT_DIR=str(tmp_path / "out"), DATA_DIR=str(tmp_path / "data"),
                   **extra)
        log.unlink(missing_ok=True)
        proc = subprocess.run(TRAIN_SH, env=env, capture_output=True, text=True, timeout=120)
        started = log.read_text().split() if log.exists() else []
        return proc.returncode, proc.stderr, started

    return run


# (settings, the start of the one error line, a word of what it accepts); today's main: usage pages,
# "unbound variable", tracebacks after the model loaded, or a silent full fine-tune
BAD_SETTINGS = [
    ({"EPOCHS": "abc"}, "EPOCHS=abc:", "number > 0"),
    ({"LR": "abc"}, "LR=abc:", "number > 0"),
    ({"PRECISION": "fp16"}, "PRECISION=fp16:", "bf16_lean"),
    ({"LORA_R": "abc"}, "LORA_R=abc:", "whole number >= 0"),
    ({"LORA_R": "-4"}, "LORA_R=-4:", "whole number >= 0"),
    ({"BATCH_SIZE": "-2"}, "BATCH_SIZE=-2:", "whole number >= 1"),
    ({"GRAD_ACCUM": "0"}, "GRAD_ACCUM=0:", "whole number >= 1"),
    ({"RESUME": "/nope/checkpoint-5"}, "RESUME=/nope/checkpoint-5: no such folder", "checkpoint-N"),
    ({"MAX_STEPS": "ten"}, "MAX_STEPS=ten:", "whole number >= 1"),
    ({"SCHEDULER": "cosin"}, "SCHEDULER=cosin:", "cosine_with_restarts"),
    ({"GRADIENT_CHECKPOINTING": "maybe"}, "GRADIENT_CHECKPOINTING=maybe:", "true"),
    ({"LORA_TARGETS": "language,text"}, "LORA_TARGETS=language,text:", "projector"),
    ({"NUM_GPUS": "0"}, "NUM_GPUS=0:", "auto"),
    ({"SAVE_STEPS": "10", "EVAL_STEPS": "3"}, "EVAL_STEPS=3:", "divisor of SAVE_STEPS=10"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"}, "NODE_RANK=2:", "NNODES-1"),
    ({"REPORT_TO": "wandbb"}, "REPORT_TO=wandbb:", "tensorboard"),
]


@pytest.mark.parametrize(("settings", "starts", "accepts"), BAD_SETTINGS,
                         ids=["+".join(f"{k}={v}" for k, v in s.items()) for s, _, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_before_anything_loads(train_sh, settings, starts, accepts) -> None:
    rc, err, started = train_sh(**settings)
    assert rc == 2 and "Traceback" not in err and "usage:" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {starts}") and accepts in errors[0], err
    assert len(err.strip().splitlines()) == 1, err  # nothing else: no usage page, no bash complaint
    # neither the GPU probe nor the training script ran
    assert started == ["paddleocr_vl_manga.train.settings"], started


def test_resume_needs_a_complete_checkpoint(train_sh, tmp_path: Path) -> None:
    half = tmp_path / "out" / "checkpoint-5"
    half.mkdir(parents=True)  # a save cut off before trainer_state.json
    rc, err, _ = train_sh(RESUME=str(half))
    assert rc == 2 and f"error: RESUME={half}: not a complete checkpoint" in err, err
    (half / "trainer_state.json").write_text("{}")
    assert train_settings.problems({"RESUME": str(half)}) == []


def test_every_setting_has_a_check() -> None:
    assert set(train_settings.setting_names()) == set(train_settings.CHECKS)


def test_good_values_pass() -> None:
    good = {"EPOCHS": "0.5", "MAX_STEPS": "30", "LR": "1e-5", "LORA_R": "16", "LORA_ALPHA": "",
            "BF16": "auto",
            "GRADIENT_CHECKPOINTING": "Off", "SAVE_STEPS": "0.25", "EVAL_STEPS": "0.05", "NUM_GPUS": "auto",
            "RESUME": "none", "REPORT_TO": "tensorboard,wandb", "LORA_TARGETS": "language,vision",
            "SCHEDULER": "cosine", "MASTER_PORT": "29500", "WARMUP": "0"}
    assert train_settings.problems(good) == []


def test_look_alikes_of_settings_are_named() -> None:
    environ = {"EPOCH": "1", "LEARNING_RATE": "1e-5", "epochs": "2", "BATCHSIZE": "4", "WARMUP_RATIO": "0.1",
               "NUM_EPOCHS": "3", "GRAD": "8",
               # what shells, launchers and libraries set: never a misspelt setting
               "PATH": "/bin", "HOME": "/root", "PYTHONPATH": ".", "PYTHONHASHSEED": "0", "LOCAL_RANK": "0",
               "RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "TZ": "UTC", "SLURM_NNODES": "2", "CUDA_HOME": "/usr/local/cuda", "HF_HOME": "/hf",
               "TOKENIZERS_PARALLELISM": "true", "PYTORCH_CUDA_ALLOC_CONF": "x", "DEMO_EPOCHS": "4",
               "EPOCHS": "3", "LR": "1e-5"}
    lines = train_settings.look_alikes(environ, train_settings.setting_names())
    meant = {line.split("=", 1)[0]: line.split("did you mean ")[1].split("?")[0] for line in lines}
    assert meant == {"EPOCH": "EPOCHS", "LEARNING_RATE": "LR", "epochs": "EPOCHS", "BATCHSIZE": "BATCH_SIZE",
                     "WARMUP_RATIO": "WARMUP", "NUM_EPOCHS": "EPOCHS", "GRAD": "GRAD_ACCUM"}, lines


def test_cluster_job_variables_are_not_look_alikes() -> None:
    """Environment Modules and Lmod set the first ones in every job on most Slurm clusters (MODULEPATH is 2
    edits from MODEL_PATH), Kubeflow's PyTorchJob sets torchrun's PET_* in every pod (PET_NNODES ends with
    _NNODES), and MODE and REPO are common variables (MODEL_PATH and REPORT_TO begin with them): each used to
    warn in every run there."""
    environ = {"MODULEPATH": "/opt/modulefiles", "MODULESHOME": "/usr/share/lmod", "MODULES_CMD": "/x",
               "MODULEPATH_ROOT": "/opt", "LMOD_CMD": "/x", "LOADEDMODULES": "cuda/12", "PET_NNODES": "2",
               "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": "job-master-0",
               "PET_MASTER_PORT": "23456", "MODEL_PATH": "./m", "MODELPATH": "./m",
               "MODE": "production", "REPO": "org/repo"}  # not a cut-off MODEL_PATH, REPORT_TO
    lines = train_settings.look_alikes(environ, train_settings.setting_names())
    assert [line.split("=", 1)[0] for line in lines] == ["MODELPATH"], lines  # a real typo still warns


def test_typo_warns_and_max_steps_reaches_the_trainer(train_sh) -> None:
    """MAX_STEPS=30 used to be ignored silently, and so was EPOCH=1."""
    rc, err, started = train_sh(EPOCH="1", MAX_STEPS="30", DRY_RUN="1")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: EPOCH=1 is not a train.sh setting"), err
    assert "did you mean EPOCHS?" in warnings[0]
    # DRY_RUN: nothing trained
    assert started == ["paddleocr_vl_manga.train.settings", "paddleocr_vl_manga.train.launch"]


def test_max_steps_is_passed_on(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in train_settings.CHECKS}
    env.update(PYTHON=sys.executable, DRY_RUN="1", MAX_STEPS="30", OUTPUT_DIR=str(tmp_path / "o"))
    out = subprocess.run(TRAIN_SH, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    words = out.splitlines()[-1].split()
    assert words[words.index("--max_steps") + 1] == "30"
    env.pop("MAX_STEPS")
    out = subprocess.run(TRAIN_SH, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--max_steps" not in out.split()  # unset: EPOCHS decide
