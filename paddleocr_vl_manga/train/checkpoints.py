"""Checkpoints that survive real machines: the output folder and disk checked at start, the newest complete
checkpoint, what each records of its run (precision, optimizer, layout) and the resume check against it, and
writes that fail on a full disk named in one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer import OPTIMIZER_NAME

from paddleocr_vl_manga.train.arguments import ModelArguments

logger = logging.getLogger("sft")

class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file-size limit); the half-written one is removed."""


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file-size limit (ulimit -f) stopped the write"}


def write_failure(error: BaseException, folder: Path) -> str | None:
    """'could not write FILE: the disk is full (...)' when `error` is a write that ran out of disk or hit the
    file-size limit while saving into `folder`; None for anything else. safetensors says `os error 28`,
    open()/write() raise OSError, and torch.save a RuntimeError that names neither: there the file's size
    against RLIMIT_FSIZE, or the free space left, tells which."""
    import resource

    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    name = failed_file(error, folder)
    if code is None and isinstance(error, RuntimeError):  # torch.save's error gives no cause
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        size = Path(name).stat().st_size if Path(name).is_file() else 0
        if limit != resource.RLIM_INFINITY and size >= limit:
            code = errno.EFBIG
        elif shutil.disk_usage(folder.parent).free < 2**20:
            code = errno.ENOSPC
    if code not in WRITE_ERRNOS:
        return None
    return f"could not write {name}: {WRITE_ERRNOS[code]} ({os.strerror(code)})"


def failed_file(error: BaseException, folder: Path) -> str:
    """The file in `folder` whose write raised `error`: OSError names it; safetensors' and torch's errors do
    not, but the writer's frame holds it (save_file's `filename`, torch.save's `f`)."""
    if getattr(error, "filename", None):
        return str(error.filename)
    tb, frames = error.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and Path(value).parent == folder:
                return str(value)
    return str(folder)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """Newest checkpoint-N whose trainer_state.json (written last by the Trainer) is complete.

    A run killed while saving leaves a checkpoint folder without it; resuming from that would fail.
    """
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        try:
            json.loads((path / "trainer_state.json").read_text())
            found.append((int(path.name.split("-")[-1]), str(path)))
        except (OSError, ValueError):
            logger.warning("ignoring incomplete checkpoint %s", path)
    return max(found)[1] if found else None


RUN_SETUP_FILE = "run_setup.json"  # in every checkpoint-N: what its optimizer state and steps depend on


class ResumeMismatch(ValueError):
    """The checkpoint's optimizer state was made with another precision or optimizer than this run's."""


def run_setup(model_args: ModelArguments, args: TrainingArguments) -> dict[str, Any]:
    """This run's precision, optimizer and batch layout, as recorded in each checkpoint (RUN_SETUP_FILE)."""
    lean_optimizer_used = model_args.precision == "bf16_lean" and not model_args.lora_r
    optim = getattr(args.optim, "value", str(args.optim))
    return {
        "precision": model_args.precision,
        "lora_r": model_args.lora_r,
        # torch's AdamW variants (adamw_torch, _fused) share one state layout; optimi's adds kahan_comp
        "optimizer": "optimi.AdamW" if lean_optimizer_used else
                     "torch.optim.AdamW" if optim.startswith("adamw_torch") else optim,
        "kahan_sum": lean_optimizer_used,
        "optim": optim,
        "world_size": args.world_size,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }


def _describe(setup: dict[str, Any]) -> str:
    kahan = " with Kahan summation" if setup.get("kahan_sum") else ""
    return f"{setup.get('precision')} ({setup.get('optimizer')}{kahan})"


def _crops_a_step(setup: dict[str, Any]) -> int:
    return setup["world_size"] * setup["per_device_train_batch_size"] * setup["gradient_accumulation_steps"]


def resume_notes(checkpoint: str | None, setup: dict[str, Any], reset_optimizer: bool) -> list[str]:
    """Check a checkpoint's recorded setup against this run's before anything is loaded; the lines to log
    (warnings). Raises ResumeMismatch, one line naming both settings and the two ways on, where the
    precision or the optimizer differs: the saved optimizer state would not fit (torch-optimi 0.3.3 handed
    torch's AdamW state crashes at the first step, KeyError 'kahan_sum', after the weights have loaded),
    unless reset_optimizer accepts a fresh one."""
    if not checkpoint:
        return []
    name, notes = Path(checkpoint).name, []
    try:
        saved = json.loads((Path(checkpoint) / RUN_SETUP_FILE).read_text())
    except FileNotFoundError:
        saved = _setup_from_optimizer_state(Path(checkpoint), setup)
        known = (f"its optimizer state shows a {_describe(saved)} run, its world size is" if saved else
                 "its precision, optimizer and world size are")
        notes.append(f"{name} has no {RUN_SETUP_FILE} (saved before checkpoints recorded it): {known} not "
                     "checked; resuming it as saved")
    except ValueError as e:  # written before trainer_state.json: cut short only in an incomplete checkpoint
        raise ResumeMismatch(f"{checkpoint}/{RUN_SETUP_FILE} is cut short ({e}): a save that did not finish; "
                             "resume the newest complete checkpoint with --resume_from_checkpoint auto "
                             "(RESUME=auto)") from None
    if saved is not None and bool(saved.get("lora_r")) != bool(setup["lora_r"]):
        # not an optimizer matter: the weights themselves don't fit (an adapter, or every weight)
        def kind(x: dict[str, Any]) -> str:
            return f"LoRA (--lora_r {x['lora_r']})" if x.get("lora_r") else "full fine-tuning (--lora_r 0)"

        raise ResumeMismatch(
            f"{checkpoint} was saved by a {kind(saved)} run but this run is {kind(setup)}: its weights do "
            f"not fit. Resume with LORA_R={saved.get('lora_r') or 0} for train.sh (--lora_r "
            f"{saved.get('lora_r') or 0}), or start over in another OUTPUT_DIR"
        )
    if saved is not None:
        # LoRA's adapters are fp32 with torch's AdamW in either precision: there only the optimizer matters
        full = not saved.get("lora_r") and not setup["lora_r"]
        differs = [k for k in (("precision",) if full else ()) + ("optimizer", "kahan_sum")
                   if saved.get(k) != setup[k]]
        if differs and not reset_optimizer:
            way = (f"PRECISION={saved['precision']} for train.sh (--precision {saved['precision']})"
                   if "precision" in differs else f"--optim {saved.get('optim')}")
            raise ResumeMismatch(
                f"{checkpoint} was saved by a {_describe(saved)} run but this run is {_describe(setup)}: its "
                f"optimizer state does not fit. Either resume with the checkpoint's settings, {way}, or "
                "accept a fresh optimizer state with --reset_optimizer_on_resume true (weights and "
                "learning-rate schedule resume; Adam's moments start from zero)"
            )
        layout = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
        if all(k in saved for k in layout) and any(saved[k] != setup[k] for k in layout):
            notes.append(_layout_change(checkpoint, saved, setup))
    if reset_optimizer:
        notes.append(f"--reset_optimizer_on_resume: {name}'s weights and learning-rate schedule resume; its "
                     "optimizer state is not loaded, the optimizer starts fresh (Adam's moments from zero)")
    return notes


def _setup_from_optimizer_state(checkpoint: Path, setup: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint saved before RUN_SETUP_FILE: whether its optimizer.pt holds optimi's state (its param
    groups carry kahan_sum), as a record resume_notes can compare (what the files can't show is this run's),
    or None without a readable optimizer.pt. Full fine-tunes use optimi exactly in bf16_lean (run_setup).
    mmap: only the groups are read, not the ~7 GB of fp32 Adam moments."""
    try:
        state = torch.load(checkpoint / OPTIMIZER_NAME, map_location="cpu", weights_only=True, mmap=True)
        optimi = any("kahan_sum" in group for group in state["param_groups"])
    except (OSError, RuntimeError, KeyError, TypeError):
        return None
    adapter = checkpoint / "adapter_config.json"  # a LoRA checkpoint: its rank
    lora = json.loads(adapter.read_text()).get("r", 1) if adapter.is_file() else 0
    torch_optimizer = setup["optimizer"] if setup["optimizer"] != "optimi.AdamW" else "torch.optim.AdamW"
    return {**setup, "lora_r": lora,
            "precision": setup["precision"] if lora else "bf16_lean" if optimi else "fp32_master",
            "optimizer": "optimi.AdamW" if optimi else torch_optimizer, "kahan_sum": optimi}


def _layout_change(checkpoint: str, saved: dict[str, Any], setup: dict[str, Any]) -> str:
    """One line: how a checkpoint's steps map to samples when processes, batch or accumulation changed."""
    try:
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
    old, new = _crops_a_step(saved), _crops_a_step(setup)

    def layout(x: dict[str, Any]) -> str:
        return (f"{x['world_size']} process{'es' if x['world_size'] > 1 else ''} x batch "
                f"{x['per_device_train_batch_size']} x accumulation {x['gradient_accumulation_steps']}")

    return (f"{Path(checkpoint).name} was saved by {layout(saved)} = {old} crops a step, this run has "
            f"{layout(setup)} = {new}: global step {step} = {step} x {old} = {step * old:,} crops seen; the "
            f"run goes on from step {step} at {new} crops a step (max_steps and the schedule count steps), "
            f"its data order resuming {step * new:,} crops in")


def main_process_decides(args: TrainingArguments, decide: Callable[[], Any]) -> Any:
    """Run `decide` on global rank 0 and hand its answer to every rank, so that ranks reading the output
    folder at slightly different moments can't reach different conclusions."""
    answer = [decide() if args.process_index == 0 else None]
    if args.world_size > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def check_output_dir(args: TrainingArguments) -> None:
    """Fail before hours of work if checkpoints can't be written, or if the ranks don't share the folder."""
    path = args.output_dir
    me = f"{socket.gethostname()}.{os.getpid()}"  # unique per process, also across nodes
    try:
        os.makedirs(path, exist_ok=True)
        probe = Path(path) / f".write_test.{me}"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to output_dir {path!r}: {e}") from None
    if args.world_size == 1:
        return
    # Rank 0 writes checkpoints that every rank resumes from and loads the best model from: all ranks must
    # see the same folder (multi-node: a shared file system).
    mark = Path(path) / f".rank0.{main_process_decides(args, lambda: me)}"
    if args.process_index == 0:
        mark.touch()
    torch.distributed.barrier()
    seen = [None] * args.world_size
    torch.distributed.all_gather_object(seen, (socket.gethostname(), appears(mark, SHARED_FS_LAG_S)))
    if args.process_index == 0:  # every rank has looked: all_gather returns only when all have answered
        mark.unlink()
    blind = sorted({host for host, ok in seen if not ok})
    if blind:
        raise SystemExit(
            f"error: output_dir {path!r} is not shared by all ranks (hosts {', '.join(blind)} don't see rank "
            "0's files): put it on a file system every node mounts at the same path"
        )


# NFS clients may cache a directory's listing for up to 60 s (acdirmax), so a file that another node has just
# created can take that long to appear; on a folder that is not shared it never does.
SHARED_FS_LAG_S = 60.0


def appears(path: Path, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def check_disk_space(args: TrainingArguments, model) -> None:
    """A checkpoint holds weights + optimizer state; a full disk mid-save would lose the run's progress."""
    # only trained tensors are saved (a LoRA checkpoint holds the adapter)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_checkpoint = weights if args.save_only_model else 3 * weights  # + two Adam moments
    free = shutil.disk_usage(args.output_dir).free
    if args.save_strategy != "no" and free < per_checkpoint:
        raise SystemExit(
            f"error: {args.output_dir} has {free / 2**30:.1f} GiB free but one checkpoint needs "
            f"~{per_checkpoint / 2**30:.1f} GiB; free some space or choose another --output_dir"
        )
    keep = (args.save_total_limit or 1) + 1
    if free < keep * per_checkpoint:
        logger.warning(
            "only %.1f GiB free in %s; %d checkpoints of ~%.1f GiB may not fit",
            free / 2**30,
            args.output_dir,
            keep,
            per_checkpoint / 2**30,
        )


def check_resume(args: TrainingArguments, setup: dict[str, Any], reset_optimizer: bool) -> None:
    """Before any data or weights are read: exit 2 with one line (rank 0 prints it) where the checkpoint to
    resume was saved with another precision or optimizer; log how it maps otherwise (resume_notes)."""
    try:
        notes = resume_notes(args.resume_from_checkpoint, setup, reset_optimizer)
    except ResumeMismatch as e:
        if args.process_index == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.process_index == 0:
        for note in notes:
            logger.warning("%s", note)
