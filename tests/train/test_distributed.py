"""Distributed training through train.sh on CPU (gloo): real DDP, a killed rank, and a 2-node job.

Each launch is a separate torchrun job of two processes on this machine. The tiny model trains in well under
a second per step, so these tests mostly pay for process start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch import TRAIN_SH, assert_same_weights, child_pids, final_state, free_port, rank_of, train_env
from safetensors.torch import load_file

from paddleocr_vl_manga.model.loading import load_model_and_processor

# 8 steps x 2 crops x 2 ranks = 32 of the 43 train crops: one epoch, so the ranks' shards stay disjoint.
# Checkpoints every 2 steps leave 6 steps of work after the first one for the kill test to interrupt.
DDP_ENV = {"NUM_GPUS": "2", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "SAVE_STEPS": "2",
           "EVAL_GENERATION_SAMPLES": "4"}
DDP_RUN = [*TRAIN_SH, "--max_steps", "8", "--max_eval_samples", "4", "--disable_tqdm", "true",
           "--generation_max_new_tokens", "8"]


def run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_rank1_after_checkpoint_2(cmd: list[str], env: dict, out: Path) -> int:
    """Start a 2-process run, kill -9 rank 1 as soon as checkpoint-2 is complete, and return the job's exit
    code once torchrun has ended rank 0 too (a bounded time, no hang); no final model may be written."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        victim, deadline = None, time.time() + 300
        while time.time() < deadline and not (out / "checkpoint-2" / "trainer_state.json").exists():
            if victim is None:  # find rank 1 early, so the kill follows the checkpoint without delay
                victim = next((p for p in child_pids(proc.pid) if rank_of(p) == 1), None)
            time.sleep(0.02)
        assert victim is not None and (out / "checkpoint-2" / "trainer_state.json").exists()
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "model.safetensors").exists()
    return rc


@pytest.fixture(scope="module")
def ddp_reference(tiny_model: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run as train.sh sets it up (best-model loading, CER at each eval)."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    run([*DDP_RUN, "--log_sample_ids", "true"], train_env(tiny_model, prepared, out, **DDP_ENV))
    return out


def test_two_processes_shard_data_and_load_best(ddp_reference: Path, prepared: Path) -> None:
    out = ddp_reference
    train_ids = {json.loads(line)["id"] for line in (prepared / "train.jsonl").read_text().splitlines()}
    seen = [set(json.loads((out / f"sample_ids_rank{r}.json").read_text())) & train_ids for r in (0, 1)]
    assert len(seen[0]) >= 16 and len(seen[1]) >= 16  # 8 steps x batch 2 (the loader may collate ahead)
    assert not seen[0] & seen[1]  # each rank trained on its own shard
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    evals = [h for h in state["log_history"] if "eval_cer" in h]
    assert [h["step"] for h in evals] == [0, 2, 4, 6, 8]  # gathered from both ranks; 0: the base
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{state['best_global_step']}")
    # The final model is the best checkpoint's weights, written once by rank 0.
    assert_same_weights(final_state(out)[0], final_state(Path(state["best_model_checkpoint"]))[0], 0, 0)
    assert not list(out.glob(".write_test.*")) and not list(out.glob(".rank0.*"))
    load_model_and_processor(str(out))


def test_kill9_of_one_rank_ends_the_job_and_rerun_resumes(
    ddp_reference: Path, tiny_model: Path, prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    env = train_env(tiny_model, prepared, out, **DDP_ENV)
    assert kill_rank1_after_checkpoint_2(DDP_RUN, env, out) != 0

    # Rerunning the same command resumes from the last complete checkpoint ...
    done = run(DDP_RUN, env)
    assert "resume: " in done.stderr and "checkpoint-" in done.stderr
    # ... and ends where the uninterrupted run ended: same step count, same weights.
    for weights in ("model.safetensors", "checkpoint-8/model.safetensors"):
        want, want_step = final_state(ddp_reference, weights)
        got, got_step = final_state(out, weights)
        assert got_step == want_step == 8
        assert_same_weights(got, want)


def test_two_nodes_match_one_node_and_one_process(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    """Node 0 and node 1 (one process each), one node of two processes, and one process with the doubled
    batch all end with the same weights: the sharding and the answer-token weighting across ranks agree."""
    # 4 steps x 2 micro-batches x 4 crops = 32 of 43 crops: one epoch, so the single process sees exactly
    # the union of what the two ranks see in every step.
    cmd = [*TRAIN_SH, "--max_steps", "4", "--max_eval_samples", "4", "--load_best_model_at_end", "false",
           "--disable_tqdm", "true", "--logging_steps", "1"]

    def env(out: str, **extra: str) -> dict:
        return train_env(tiny_model, prepared, tmp_path / out, GRAD_ACCUM="2", **extra)

    port = str(free_port())
    nodes = [
        subprocess.Popen(cmd, env=env("nodes", BATCH_SIZE="2", NNODES="2", NODE_RANK=str(rank),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_ID=f"test-{port}"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    try:
        errs = [p.communicate(timeout=600)[1] for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    run(cmd, env("one_node", BATCH_SIZE="2", NUM_GPUS="2"))
    run(cmd, env("one_process", BATCH_SIZE="4"))

    want, want_step = final_state(tmp_path / "one_node")
    for other in ("nodes", "one_process"):
        got, got_step = final_state(tmp_path / other)
        assert got_step == want_step == 4
        assert_same_weights(got, want, rtol=1e-4, atol=1e-6)
    # The tolerance is far below what training moved: a wrongly weighted or unsynchronised rank would show.
    base = load_file(str(tiny_model / "model.safetensors"))
    assert max((want[k] - base[k]).abs().max().item() for k in want if k in base) > 1e-3


def test_lora_ddp_killed_and_resumed_matches_one_process(tiny_model: Path, prepared: Path,
                                                          tmp_path: Path) -> None:
    """LORA_R over DDP with CER at each eval: rank 1 killed after checkpoint-2, the rerun resumes, and the
    adapter and merged model equal one process's with the doubled batch (adapter dropout off: its random
    masks differ between one and two processes)."""
    lora = {"LORA_R": "4", "LORA_DROPOUT": "0", "LR": "1e-2", "GRAD_ACCUM": "1", "SAVE_STEPS": "2",
            "EVAL_GENERATION_SAMPLES": "4"}
    cmd = [*TRAIN_SH, "--max_steps", "8", "--max_eval_samples", "4", "--load_best_model_at_end", "false",
           "--disable_tqdm", "true", "--generation_max_new_tokens", "8"]
    run(cmd, train_env(tiny_model, prepared, tmp_path / "one", BATCH_SIZE="4", **lora))

    out = tmp_path / "two"
    env = train_env(tiny_model, prepared, out, BATCH_SIZE="2", NUM_GPUS="2", **lora)
    assert kill_rank1_after_checkpoint_2(cmd, env, out) != 0
    done = run(cmd, env)
    assert "resume: " in done.stderr and "checkpoint-" in done.stderr

    adapters = ("checkpoint-8/adapter_model.safetensors", "adapter/adapter_model.safetensors")
    for weights in ("model.safetensors", *adapters):
        want, want_step = final_state(tmp_path / "one", weights)
        got, got_step = final_state(out, weights)
        assert got_step == want_step == 8
        assert_same_weights(got, want)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # B starts at 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_cer" in h] == [0, 2, 4, 6, 8]  # 0: the base


def test_output_dir_not_shared_by_a_node_fails_clearly(tmp_path: Path, monkeypatch) -> None:
    """Rank 1 on another host can't see the marker rank 0 wrote: every rank stops with one clear line."""
    import torch.distributed as dist

    import paddleocr_vl_manga.train.arguments as sft_arguments
    import paddleocr_vl_manga.train.checkpoints as sft_checkpoints

    *_, args = sft_arguments.parse_args(["--model_path", "m", "--output_dir", str(tmp_path / "o")])
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objs, src: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(sft_checkpoints, "SHARED_FS_LAG_S", 0.0)

    def gather(out: list, mine: tuple) -> None:  # rank 0's own view, and a rank 1 that sees nothing
        out[:] = [mine, ("node1", sft_checkpoints.appears(tmp_path / "elsewhere", 0.0))]
        assert mine[1], "rank 0 must see its own marker"

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(SystemExit, match=r"not shared by all ranks \(hosts node1 don't see"):
        sft_checkpoints.check_output_dir(args)
    assert not list((tmp_path / "o").iterdir())  # the marker is removed again
