"""Helpers for in-process training tests (tests/train/, tests/model/): a small data folder, the arguments the
tests train with, a callback that stops a run at a step."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

import paddleocr_vl_manga.train.arguments as sft_arguments


def subset(prepared: Path, dst: Path, n: int, split: str = "train") -> Path:
    """A data_dir holding the first n records of a split as train.jsonl (absolute image paths)."""
    dst.mkdir(parents=True, exist_ok=True)
    recs = [json.loads(line) for line in (prepared / f"{split}.jsonl").read_text().splitlines()][:n]
    with open(dst / "train.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps({**r, "image": str(prepared / r["image"])}, ensure_ascii=False) + "\n")
    return dst


def train_args(tiny_model: Path, data_dir: Path, out: Path, *extra: str):
    return sft_arguments.parse_args([
        "--model_path", str(tiny_model), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0",
        "--logging_steps", "10", *extra,
    ])


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control
