"""How a run is launched on a node with several GPUs: never one process over several GPUs (the Trainer's
nn.DataParallel splits pixel_values across images), simulated on the CPU by faking torch's device count.

train.sh's decisions are checked with DRY_RUN=1 (prints the command instead of running it) under a Python
whose sitecustomize fakes FAKE_GPUS CUDA devices; sft_paddleocr_vl.py's guard with a monkeypatched count."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import TRAIN_SH

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.inputs as sft_inputs
import paddleocr_vl_manga.train.run as sft

# What torch sees on a node with FAKE_GPUS GPUs of 80 GiB; as in CUDA, CUDA_VISIBLE_DEVICES hides the rest.
SITECUSTOMIZE = """
import os
from types import SimpleNamespace

import torch

_n = int(os.environ["FAKE_GPUS"])
if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
    _n = min(_n, len([d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]))
torch.cuda.device_count = lambda: _n
torch.cuda.is_available = lambda: _n > 0
torch.cuda.get_device_properties = lambda i: SimpleNamespace(name="fake", total_memory=80 * 2**30)
"""


@pytest.fixture
def dry_run(tmp_path: Path):
    """dry_run(gpus, **env) -> (return code, {variable: value} set or passed on, command, stderr)."""
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def run(gpus: int, **extra: str) -> tuple[int, dict[str, str], list[str], str]:
        mine = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "NUM_GPUS",
                "TOKENIZERS_PARALLELISM")
        env = {k: v for k, v in os.environ.items() if k not in mine}
        env.update(PYTHON=sys.executable, PYTHONPATH=str(fake), FAKE_GPUS=str(gpus), DRY_RUN="1",
                   DATA_DIR=str(tmp_path / "no_data"), OUTPUT_DIR=str(tmp_path / "out"), **extra)
        proc = subprocess.run(TRAIN_SH, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            return proc.returncode, {}, [], proc.stderr
        assert proc.stdout.startswith("train.sh: "), proc.stdout + proc.stderr
        words = shlex.split(proc.stdout.splitlines()[-1])
        n_vars = next(i for i, w in enumerate(words) if "=" not in w)
        return 0, dict(w.split("=", 1) for w in words[:n_vars]), words[n_vars:], proc.stderr

    return run


def nproc(cmd: list[str]) -> int:
    """Processes the command starts on this node: torchrun's --nproc_per_node, else 1."""
    if cmd[1:3] != ["-m", "torch.distributed.run"]:
        assert cmd[1] == "sft_paddleocr_vl.py", cmd
        return 1
    return int(cmd[cmd.index("--nproc_per_node") + 1])


def test_auto_launches_one_process_per_visible_gpu(dry_run) -> None:
    rc, env, cmd, err = dry_run(4)
    assert rc == 0, err
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and nproc(cmd) == 4
    assert "CUDA_VISIBLE_DEVICES" not in env  # all four: nothing to hide
    assert cmd[cmd.index("--bf16") + 1] == "true"  # the probe saw the fake GPUs
    # variable crop shapes fragment the caching allocator
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # a multi-node job resolves auto per node too
    rc, env, cmd, err = dry_run(4, NNODES="2", MASTER_ADDR="10.0.0.1")
    assert rc == 0 and "--nnodes" in cmd and nproc(cmd) == 4, err


def test_num_gpus_n_takes_the_first_n_visible(dry_run) -> None:
    rc, env, cmd, err = dry_run(4, NUM_GPUS="2")
    assert rc == 0 and nproc(cmd) == 2 and env["CUDA_VISIBLE_DEVICES"] == "0,1", err
    # of the user's own list, the first N; one GPU is a plain process (no torchrun); their allocator setting
    # is kept
    rc, env, cmd, err = dry_run(4, NUM_GPUS="1", CUDA_VISIBLE_DEVICES="3,5",
                                PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128")
    assert rc == 0 and nproc(cmd) == 1 and env["CUDA_VISIBLE_DEVICES"] == "3", err
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_users_cuda_visible_devices_is_left_alone(dry_run) -> None:
    rc, env, cmd, err = dry_run(4, CUDA_VISIBLE_DEVICES="3,5", PYTORCH_ALLOC_CONF="expandable_segments:False")
    assert rc == 0 and nproc(cmd) == 2 and env["CUDA_VISIBLE_DEVICES"] == "3,5", err
    # torch's newer name for the allocator setting counts as the user's choice too
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PYTORCH_ALLOC_CONF"] == "expandable_segments:False"


def test_more_gpus_than_visible_is_one_error_line(dry_run) -> None:
    rc, _, _, err = dry_run(4, NUM_GPUS="8")
    assert rc == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "NUM_GPUS=8 but only 4 GPU(s) are visible" in errors[0], err


def test_without_a_gpu_auto_is_one_process_and_n_is_n_cpu_processes(dry_run) -> None:
    rc, env, cmd, err = dry_run(0)
    assert rc == 0 and nproc(cmd) == 1 and "CUDA_VISIBLE_DEVICES" not in env, err
    rc, env, cmd, err = dry_run(0, NUM_GPUS="2")  # DDP over gloo, as test_distributed runs it
    assert rc == 0 and nproc(cmd) == 2 and "CUDA_VISIBLE_DEVICES" not in env, err


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("data or weights were read")

    # where each is looked up: the data and config in train_data, the weights in build_trainer
    for module, loader in ((sft_inputs, "mixed_train_dataset"), (sft_inputs, "load_config_and_processor"),
                           (sft_build, "load_model_and_processor")):
        monkeypatch.setattr(module, loader, must_not_load)


def test_direct_run_on_several_gpus_stops_before_reading_anything(tmp_path: Path, monkeypatch, nothing_loads,
                                                                   error_line) -> None:
    """`python sft_paddleocr_vl.py` on a 4-GPU node: TrainingArguments counts every GPU (n_gpu = 4), which
    the Trainer would turn into nn.DataParallel. (The fake keeps torch.cuda.is_available() false, so the
    arguments still set up on the CPU.)"""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    argv = ["--model_path", "PaddlePaddle/PaddleOCR-VL", "--data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    with pytest.raises(SystemExit) as stop:
        sft.main(argv)
    line = error_line(stop.value.code)
    assert line.startswith("error: 4 GPUs are visible but this is one process") and "DataParallel" in line
    assert "NUM_GPUS" in line and "CUDA_VISIBLE_DEVICES" in line and "train.sh" in line
    assert not (tmp_path / "o").exists()


def test_build_trainer_never_wraps_in_data_parallel(tmp_path: Path, nothing_loads, error_line) -> None:
    """Defence in depth, for callers that make their own TrainingArguments: n_gpu > 1 stops the build."""
    model_args, data_args, args = sft_arguments.parse_args(
        ["--model_path", "x", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "o"),
         "--report_to", "none"])
    args._n_gpu = 2  # what TrainingArguments sets outside torchrun on a 2-GPU node
    with pytest.raises(SystemExit) as stop:
        sft_build.build_trainer(model_args, data_args, args)
    assert "2 GPUs are visible" in error_line(stop.value.code)
    assert not (tmp_path / "o").exists()


def test_plan_launch_table() -> None:
    """The decision itself, as train.sh gets it from paddleocr_vl_manga.train.launch."""
    from paddleocr_vl_manga.train.launch import LaunchError, plan_launch

    assert plan_launch("auto", 0, None) == (1, None)
    assert plan_launch("auto", 8, None) == (8, None)
    assert plan_launch("3", 8, None) == (3, "0,1,2")
    assert plan_launch("2", 3, "GPU-aa, GPU-bb,GPU-cc") == (2, "GPU-aa,GPU-bb")  # UUIDs as written
    assert plan_launch("2", 2, "6,7") == (2, None)
    assert plan_launch("4", 0, "") == (4, None)  # no GPU: CPU processes
    for bad, visible in (("5", 4), ("0", 4), ("-1", 4), ("1.5", 0)):
        with pytest.raises(LaunchError):
            plan_launch(bad, visible, None)


def test_yes_no_variables_are_parsed_or_refused(dry_run) -> None:
    # REHEARSE=yes used to start the real (27-hour) run: only "1" and "true" were understood
    for value in ("1", "yes", "True", "ON"):
        rc, _, cmd, err = dry_run(0, REHEARSE=value)
        assert rc == 0 and cmd[cmd.index("--rehearse") + 1] == "true", err
    rc, _, cmd, err = dry_run(0, REHEARSE="off")
    assert rc == 0 and "--rehearse" not in cmd, err
    rc, _, _, err = dry_run(0, REHEARSE="maybe")
    assert rc == 2 and err.strip() == "error: REHEARSE=maybe: use 1/true/yes/on or 0/false/no/off", err


def test_tokenizers_parallelism_is_off_unless_set(dry_run) -> None:
    """Forked loader workers would each print tokenizers' fork warning at every evaluation."""
    rc, env, _, err = dry_run(0)
    assert rc == 0 and env["TOKENIZERS_PARALLELISM"] == "false", err
    rc, env, _, err = dry_run(0, TOKENIZERS_PARALLELISM="true")
    assert rc == 0 and env["TOKENIZERS_PARALLELISM"] == "true", err
