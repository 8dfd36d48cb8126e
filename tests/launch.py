"""Helpers for tests that start train.sh as a subprocess (single process, DDP, multi-node)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = ["bash", str(REPO / "train.sh")]


def train_env(tiny_model: Path, data: Path, out: Path, **extra: str) -> dict:
    # NUM_GPUS=1 unless a test asks for more: train.sh's default (auto) would start one process per GPU on a
    # GPU machine, and the tests compare against one process
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(tiny_model), DATA_DIR=str(data),
               OUTPUT_DIR=str(out), LR="3e-3", BATCH_SIZE="2", GRAD_ACCUM="2", SAVE_STEPS="4",
               EVAL_GENERATION_SAMPLES="0", NUM_WORKERS="0", LOGGING_STEPS="2", NUM_GPUS="1")
    env.update(extra)
    return env


def final_state(out: Path, weights: str = "model.safetensors") -> tuple[dict, int]:
    state = json.loads((out / "trainer_state.json").read_text())
    return load_file(str(out / weights)), state["global_step"]


def assert_same_weights(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (torchrun's workers), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None
