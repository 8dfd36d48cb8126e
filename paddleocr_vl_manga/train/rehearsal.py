"""A rehearsal of the full run: its exact settings for a few steps on a small sample of every split.

    bash train.sh --rehearse          (or REHEARSE=1 bash train.sh; sft_paddleocr_vl.py --rehearse ...)

The full run takes a day and meets its first evaluation, save and resume hours in, and the export only at the
end; a crash in any of them costs those hours. The rehearsal runs every stage within minutes, with the same
model, precision, LoRA, batch, accumulation, max_length, workers and processes, in OUTPUT_DIR/rehearsal
(replaced each time; the full run's RESUME=auto only looks at OUTPUT_DIR/checkpoint-*):

  setup       the full data measured and filtered as the full run does (crops dropped per split), then a
              sample in OUTPUT_DIR/rehearsal/data: the train crops of STEPS optimizer steps and a few val
              and test crops, spread over the books, the longest kept crops first (sequential batches make
              them the first micro-batch, so the measured peak memory is the worst the full run meets);
              the first train answer's label tokens logged and every label checked, and the checkpoint the
              full run would resume checked against its precision and optimizer (sft_checkpoints.resume_notes)
  evaluation  the base at step 0 (as --eval_base), then after every step, with CER generation when on
  save        a checkpoint after every step, so the best one always exists to be loaded at the end
  resume      the first trainer ends right after checkpoint-KILLED_AT, as if killed; a second one is built
              with resume_from_checkpoint auto, as a rerun would be, and must start at that step
  end         the best checkpoint loaded, the final model exported like the base (LoRA: merged),
              trainer_state.json and the curves: what the full run does last

Then it prints what the full run will do (optimizer steps, crops dropped, the memory plan vs the measured
peak, seconds per step, projected time) and returns 0, or prints the stage that failed in one line and
returns 2 (the traceback in OUTPUT_DIR/rehearsal/rehearsal_error.txt). The numbers are also written to
OUTPUT_DIR/rehearsal/rehearsal.json. Its checkpoints are removed at the end: on the 0.9B model each holds
~11 GB that the full run will need.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainerCallback, TrainingArguments

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.checkpoints as sft_checkpoints
import paddleocr_vl_manga.train.inputs as sft_inputs
import paddleocr_vl_manga.train.trainer as sft_trainer
from paddleocr_vl_manga.data.dataset import OCRDataset, spread_sample
from paddleocr_vl_manga.train.trainer import optimizer_steps

logger = logging.getLogger("sft.rehearsal")

FOLDER = "rehearsal"  # under OUTPUT_DIR
# Optimizer steps: two before the simulated kill and two after the resume, so that each trainer has a step
# after its first to time (a trainer's first step also pays for starting the loader's workers).
STEPS = 4
KILLED_AT = 2
EXTRA_VAL = 2  # val crops per process beside the longest, spread over the books
TEST_CROPS = 4  # test crops: only measured, as in the full run


class Interrupted(Exception):
    """Raised right after checkpoint-KILLED_AT is complete: the first trainer ends there, as if killed."""


class StageFailed(Exception):
    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.stage, self.detail = stage, detail  # detail: for the traceback file


class FullRun(NamedTuple):
    """What the full run will do, from the user's arguments and the full, filtered data (rank 0)."""

    train_crops: int
    steps: int
    steps_per_epoch: int
    batch: int  # per device
    accumulation: int
    processes: int
    evals: int
    saves: int
    loss_crops: int  # val crops of each evaluation's loss, and of its CER sample
    generation_crops: int
    eval_batches: int  # per process, of the loss and of CER generation
    generation_batches: int
    split_lines: list[str]
    plan_verdict: str
    resume_from: str | None
    answer_tokens: str = ""  # the first train answer's labelled tokens on the user's tokenizer


class Probe(TrainerCallback):
    """Names the stage in progress and times steps, evaluations and saves, across both trainers.

    A step's time runs from the end of whatever came before it (the previous step, a log, an evaluation, a
    save) to its own end, so it includes fetching its micro-batches, which Trainer does before on_step_begin.
    """

    def __init__(self) -> None:
        self.stage = "setup"
        self.mark = time.perf_counter()
        self.steps: list[tuple[int, float, bool]] = []  # (global step, seconds, first of its trainer)
        # (global step, seconds, of which generation, seconds per loss batch after the first)
        self.evals: list[tuple[int, float, float, float | None]] = []
        self.saves: list[tuple[int, float]] = []
        self.start_steps: list[int] = []  # global step at each trainer's start
        self.best_loaded: str | None = None
        self.stop_after: int | None = None
        self._generation = 0.0
        self._batch_ends: list[float] = []
        self._first_step = False

    def _now(self) -> float:
        if torch.cuda.is_available():  # CUDA runs ahead of the host: time the work, not its launch
            torch.cuda.synchronize()
        return time.perf_counter()

    def watch(self, trainer: sft_trainer.BF16Trainer) -> None:
        """Wrap the trainer's evaluation, generation, checkpoint save and best-model load (on the instance,
        where Trainer looks them up), so each names its stage and is timed."""

        def wrap(name: str, stage: str, done: Callable[[float], None]) -> None:
            inner = getattr(trainer, name)

            def timed(*args: Any, **kwargs: Any) -> Any:
                outer, self.stage = self.stage, f"{stage} at step {trainer.state.global_step}"
                start = self._now()
                result = inner(*args, **kwargs)
                self.mark = self._now()
                done(self.mark - start)
                self.stage = outer
                return result

            setattr(trainer, name, timed)

        def evaluated(seconds: float) -> None:
            ends, self._batch_ends = self._batch_ends, []
            per_batch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
            self.evals.append((trainer.state.global_step, seconds, self._generation, per_batch))
            self._generation = 0.0

        def generated(seconds: float) -> None:
            self._generation += seconds

        def saved(seconds: float) -> None:
            self.saves.append((trainer.state.global_step, seconds))

        def loaded(seconds: float) -> None:
            self.best_loaded = trainer.state.best_model_checkpoint

        wrap("evaluate", "evaluation", evaluated)
        wrap("generation_metrics", "evaluation (CER generation)", generated)
        wrap("_save_checkpoint", "checkpoint save", saved)
        wrap("_load_best_model", "best-model load", loaded)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_steps.append(state.global_step)
        self._first_step = True
        self.mark = self._now()

    def on_step_begin(self, args, state, control, **kwargs):
        self.stage = f"training step {state.global_step + 1}"

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.steps.append((state.global_step, now - self.mark, self._first_step))
        self._first_step, self.mark = False, now

    def on_prediction_step(self, args, state, control, **kwargs):
        self._batch_ends.append(self._now())

    def on_log(self, args, state, control, **kwargs):
        self.mark = self._now()

    def on_save(self, args, state, control, **kwargs):
        self.mark = self._now()
        if state.global_step == self.stop_after:
            raise Interrupted


def events(strategy: Any, every: float | None, total: int, per_epoch: int) -> int:
    """How many evaluations or saves a schedule makes in `total` steps: a step schedule also acts at the
    last step (DefaultFlowCallback); a ratio < 1 is a fraction of all steps."""
    if strategy == "epoch":
        return math.ceil(total / per_epoch)
    if strategy != "steps" or not every:
        return 0
    every = math.ceil(total * every) if every < 1 else int(every)
    return total // every + (total % every > 0)


def batches(crops: int, size: int, world: int) -> int:
    """Batches each process runs for `crops` dealt out in batches of `size` (evened out over processes)."""
    return math.ceil(math.ceil(crops / size) / world)


def generation_batches(crops: int, size: int, world: int) -> int:
    """generate() calls of each process: generation_metrics gives rank r crops r, r + world, ..."""
    return math.ceil(math.ceil(crops / world) / size)


def longest_then_spread(
    records: list[dict], lengths: list[int], n: int, longest: int, seed: int
) -> list[dict]:
    """n records: the `longest` longest (longest first), then a spread over the books of the rest."""
    top = sorted(range(len(records)), key=lambda i: (-lengths[i], i))[:longest]
    chosen = set(top)
    rest = [r for i, r in enumerate(records) if i not in chosen]
    return [records[i] for i in top] + spread_sample(rest, max(n - len(top), 0), seed)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Records as prepare writes them, with absolute image paths (the images stay where they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            keep = {k: v for k, v in r.items() if not k.startswith("_") and k != "image_path"}
            f.write(json.dumps({**keep, "image": r["image_path"]}, ensure_ascii=False) + "\n")


def prepare(
    model_args: sft_arguments.ModelArguments, data_args: sft_arguments.DataArguments, args: TrainingArguments,
    out: Path,
) -> FullRun:
    """Rank 0: measure the full data as the full run will, forecast the run, and write the sample."""
    resume = args.resume_from_checkpoint
    if resume == "auto":
        resume = sft_checkpoints.latest_complete_checkpoint(args.output_dir)
    # the full run's checkpoint must fit its precision and optimizer (raises ResumeMismatch, one line)
    setup = sft_checkpoints.run_setup(model_args, args)
    sft_checkpoints.resume_notes(resume, setup, model_args.reset_optimizer_on_resume)
    data = sft_inputs.train_data(model_args, data_args, args)
    plan = sft_inputs.run_memory_plan(model_args, data_args, args, data)
    n_train = len(data.train)
    total, per_epoch = optimizer_steps(n_train, args)
    world, seed = args.world_size, args.data_seed or args.seed
    val = data.val
    n_val = len(val) if val is not None else 0
    evals = events(args.eval_strategy, args.eval_steps, total, per_epoch) + data_args.eval_base
    evals = evals if val is not None else 0  # build_trainer turns evaluation off without val
    loss_crops = n_val if data_args.max_eval_samples is None else min(n_val, data_args.max_eval_samples)
    gen_crops = min(n_val, data_args.eval_generation_samples)

    if out.exists():  # an earlier rehearsal's checkpoints would be picked up by the resume stage
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    micro = args.per_device_train_batch_size
    n = micro * args.gradient_accumulation_steps * world * STEPS
    write_jsonl(out / "data" / "train.jsonl",
                longest_then_spread(data.train.records, data.splits[0].lengths, n, micro * world, seed))
    if val is not None:
        gen = min(data_args.eval_generation_samples, data_args.generation_batch_size)
        worst = world * max(args.per_device_eval_batch_size, gen)  # a full loss and generation batch each
        lengths = next(s.lengths for s in data.splits if s.split == "val")
        write_jsonl(out / "data" / "val.jsonl",
                    longest_then_spread(val.records, lengths, worst + world * EXTRA_VAL, worst, seed))
    test = Path(data.mix[0]["folder"]) / "test.jsonl"
    if test.is_file() and test.stat().st_size > 0:
        write_jsonl(out / "data" / "test.jsonl", spread_sample(OCRDataset(test).records, TEST_CROPS, seed))

    return FullRun(
        train_crops=n_train, steps=total, steps_per_epoch=per_epoch, batch=micro,
        accumulation=args.gradient_accumulation_steps, processes=world,
        evals=evals, saves=events(args.save_strategy, args.save_steps, total, per_epoch),
        loss_crops=loss_crops, generation_crops=gen_crops,
        eval_batches=batches(loss_crops, args.per_device_eval_batch_size, world),
        generation_batches=generation_batches(gen_crops, data_args.generation_batch_size, world),
        split_lines=[s.line(used=s.split != "test") for s in data.splits],
        plan_verdict=plan.splitlines()[-1], resume_from=resume, answer_tokens=data.answer_tokens,
    )


def rehearsal_args(argv: list[str], out: Path, resume: str | None):
    """The user's arguments with the rehearsal's folder, data and schedule on top (later flags win)."""
    schedule = ["--output_dir", str(out), "--data_dir", str(out / "data"), "--max_steps", str(STEPS),
                "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps",
                "--save_steps", "1", "--logging_steps", "1",
                # the longest crops were written first: sequential batches make them the first micro-batch
                "--train_sampling_strategy", "sequential"]
    model_args, data_args, args = sft_arguments.parse_args([*argv, *schedule])
    data_args.max_train_samples = None  # the sample is the train set
    args.resume_from_checkpoint = resume
    return model_args, data_args, args


def release_memory() -> None:
    """Collect a dropped trainer's model and optimizer before the next is built (its wrapped methods make
    reference cycles; two 0.9B fp32 runs at once would not fit most GPUs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stages(argv: list[str], out: Path, probe: Probe) -> dict[str, Any]:
    """Both trainers and the end of the run; raises StageFailed, or whatever a stage raised."""
    model_args, data_args, args = rehearsal_args(argv, out, None)
    probe.stage = "setup"
    trainer = sft_build.build_trainer(model_args, data_args, args, callbacks=[probe])
    probe.watch(trainer)
    probe.stop_after, probe.stage = KILLED_AT, "training step 1"
    try:
        trainer.train()
    except Interrupted:
        pass
    else:
        raise StageFailed("checkpoint save", f"the first trainer ended without saving checkpoint-{KILLED_AT}")
    trainer = None
    release_memory()
    probe.stop_after = None

    probe.stage = "resume"
    model_args, data_args, args = rehearsal_args(argv, out, "auto")
    # auto -> the checkpoint
    trainer = sft_build.build_trainer(model_args, data_args, args, callbacks=[probe])
    want = str(out / f"checkpoint-{KILLED_AT}")
    if args.resume_from_checkpoint != want:
        raise StageFailed("resume", f"--resume_from_checkpoint auto chose {args.resume_from_checkpoint}, "
                          f"not {want}")
    checkpoint_files = sorted(p.name for p in Path(want).iterdir())
    probe.watch(trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if probe.start_steps[-1] != KILLED_AT:
        raise StageFailed("resume", f"the resumed trainer started at step {probe.start_steps[-1]}, "
                          f"not at {KILLED_AT}")
    if probe.best_loaded is None and args.load_best_model_at_end:
        raise StageFailed("best-model load", "the trainer loaded no best checkpoint at the end")

    probe.stage = "export"
    # save_final_model prints its error (several lines, rank 0) and returns False: keep its first line for
    # the one line (progress bars print to stderr too)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        ok = sft_build.finish_run(trainer, model_args, data_args, args)
    sys.stderr.write(err.getvalue() if ok else "")
    if not ok:
        lines = err.getvalue().splitlines()
        first = next((x for x in lines if x.startswith("error: ")), "failed on rank 0")
        raise StageFailed("export", first, detail=err.getvalue())
    n_loss = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    n_gen = len(trainer.gen_dataset) if trainer.gen_dataset is not None else 0
    return {
        "resumed_from": args.resume_from_checkpoint, "checkpoint_files": checkpoint_files,
        "eval_crops": n_loss, "generation_crops": n_gen,
        "eval_batches": batches(n_loss, args.per_device_eval_batch_size, args.world_size),
        "generation_batches": generation_batches(n_gen, data_args.generation_batch_size, args.world_size),
        "metric": args.metric_for_best_model, "best_metric": trainer.state.best_metric,
        "final_step": trainer.state.global_step,
    }


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    seconds = round(seconds)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
    return f"{seconds // 3600:,} h {seconds % 3600 // 60} min"


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def forecast(full: FullRun, probe: Probe, done: dict[str, Any], peak: int | None) -> dict[str, Any]:
    """What was measured, and the full run's time from it: steps x s/step, plus evaluations and saves."""
    step_s = mean([s for _, s, first in probe.steps if not first])
    later = probe.evals[1:]  # the first evaluation pays for warm-up
    eval_s = None
    if later and done["eval_batches"]:
        # The loss: as measured, plus each further batch at the measured time of a batch after the first
        # (the first also pays for starting the loader's workers); failing that, in proportion to batches.
        loss_s = mean([t - g for _, t, g, _ in later])
        per_batch = mean([b for *_, b in later if b is not None])
        extra = full.eval_batches - done["eval_batches"]
        eval_s = loss_s + extra * (per_batch if per_batch is not None else loss_s / done["eval_batches"])
        if done["generation_batches"]:  # CER: in proportion to the generate() calls
            eval_s += mean([g for _, _, g, _ in later]) * full.generation_batches / done["generation_batches"]
    save_s = mean([s for _, s in probe.saves])
    parts = {"steps": full.steps * step_s if step_s is not None else None,
             "evaluations": full.evals * eval_s if eval_s is not None else 0.0,
             "saves": full.saves * save_s if save_s is not None else 0.0}
    measured = {
        "seconds_per_step": step_s, "steps_timed": [g for g, _, first in probe.steps if not first],
        "seconds_per_eval_full_size": eval_s, "seconds_per_save": save_s, "peak_memory_bytes": peak,
        "steps": [[g, s] for g, s, _ in probe.steps],
        "evals": [list(e) for e in probe.evals],
        "evals_columns": ["step", "seconds", "of which generation", "seconds per loss batch after the first"],
        "saves": [list(s) for s in probe.saves],
    }
    return {
        "full_run": full._asdict(),
        "rehearsal": {**done, "start_steps": probe.start_steps, "best_loaded": probe.best_loaded},
        "measured": measured,
        "projected": {"seconds": None if parts["steps"] is None else sum(parts.values()), **parts},
    }


def summary(result: dict[str, Any], out: Path, world: int, elapsed: float) -> str:
    full, done, got, proj = (result[k] for k in ("full_run", "rehearsal", "measured", "projected"))
    evals = ", ".join(str(e[0]) for e in got["evals"])
    n_gen = done["generation_crops"]
    best = Path(done["best_loaded"]).name if done["best_loaded"] else "none"
    lines = [
        f"rehearsal passed in {duration(elapsed)}: "
        + (f"evaluation at steps {evals} ({f'CER on {n_gen:,} crops' if n_gen else 'loss only'}), "
           if evals else "no evaluation (no val split), ")
        + f"checkpoint saves, resume from {Path(done['resumed_from']).name} (started at step "
        f"{done['start_steps'][-1]}), best-model load ({best}), export",
        f"full run: {full['steps']:,} optimizer steps ({full['steps'] / full['steps_per_epoch']:.3g} epochs "
        f"of {full['train_crops']:,} train crops; batch {full['batch']:,} x accumulation "
        f"{full['accumulation']:,} x {world:,} process{'es' if world > 1 else ''} = "
        f"{full['batch'] * full['accumulation'] * world:,} crops a step)",
        f"labels: {full['answer_tokens']}",
        "crops over max_length (full data):",
        *(f"  {line}" for line in full["split_lines"]),
    ]
    peak = got["peak_memory_bytes"]
    measured = (f"measured peak {peak / 2**30:.2f} GiB (torch.cuda.max_memory_allocated, largest rank)"
                if peak is not None else "peak not measured (no CUDA device; CPU memory is not tracked)")
    lines.append(f"memory: plan: {full['plan_verdict']}; {measured}")
    step_s = got["seconds_per_step"]
    if step_s is None:
        lines.append("speed: not measured (no step was timed)")
    else:
        timed = ", ".join(map(str, got["steps_timed"]))
        lines.append(f"speed: {step_s:.3g} s per optimizer step (mean of steps {timed}: each trainer's first "
                     "step, evaluations and saves left out)")
        line = (f"projected time of the full run: {duration(proj['seconds'])} = {full['steps']:,} steps x "
                f"{step_s:.3g} s ({duration(proj['steps'])})")
        eval_s = got["seconds_per_eval_full_size"]
        if full["evals"] and eval_s is not None:
            line += (f" + {full['evals']:,} evaluations x {duration(eval_s)} "
                     f"({duration(proj['evaluations'])}: the rehearsal's, scaled to {full['loss_crops']:,} "
                     f"val crops for the loss and {full['generation_crops']:,} decoded for CER, assuming "
                     "time grows with batches; its crops are the longest, so this errs long)")
        if full["saves"] and got["seconds_per_save"] is not None:
            line += (f" + {full['saves']:,} saves x {duration(got['seconds_per_save'])} "
                     f"({duration(proj['saves'])})")
        lines.append(line)
    if full["resume_from"]:
        lines.append(f"note: the full run will resume from {full['resume_from']} (RESUME=none starts over)")
    lines.append(f"rehearsal folder: {out} (its checkpoints removed; the exported model and logs kept)")
    return "\n".join(lines)


def peak_memory(args: TrainingArguments) -> int | None:
    """The largest torch.cuda.max_memory_allocated over the ranks; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    peaks = [torch.cuda.max_memory_allocated()]
    if args.world_size > 1:
        peaks = [None] * args.world_size
        torch.distributed.all_gather_object(peaks, torch.cuda.max_memory_allocated())
    return max(peaks)


def rehearse(argv: list[str]) -> int:
    """Rehearse the run that `argv` (sft_paddleocr_vl.py's arguments) describes: 0 if every stage passed."""
    model_args, data_args, args = sft_arguments.parse_args(argv)
    out = Path(args.output_dir) / FOLDER
    rank = args.process_index
    probe, started = Probe(), time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def decide() -> tuple[FullRun | None, str | None, str]:
        try:
            return prepare(model_args, data_args, args, out), None, ""
        except (Exception, SystemExit) as e:  # every rank must learn of it, or the others wait forever
            return None, f"{type(e).__name__}: {e}", traceback.format_exc()

    try:
        return _rehearse(argv, args, out, probe, started, decide)
    finally:  # passed or failed: its checkpoints (~11 GB each on the 0.9B model) must not eat the run's disk
        if rank == 0:
            for checkpoint in out.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)


def _rehearse(argv: list[str], args: Any, out: Path, probe: Probe, started: float, decide: Any) -> int:
    rank, world = args.process_index, args.world_size
    trace = ""
    try:
        full, error, trace = sft_checkpoints.main_process_decides(args, decide)
        if error is not None:
            raise StageFailed("setup", error)
        done = run_stages(argv, out, probe)
        peak = peak_memory(args)
    except (Exception, SystemExit) as e:  # SystemExit: build_trainer's checks of the output folder
        stage = e.stage if isinstance(e, StageFailed) else probe.stage
        known = isinstance(e, (StageFailed, SystemExit))  # their message says it all; others need the type
        message = " ".join((str(e) if known else f"{type(e).__name__}: {e}").split())
        message = message.removeprefix("error: ") or type(e).__name__
        note = out / (f"rehearsal_error_rank{rank}.txt" if world > 1 else "rehearsal_error.txt")
        with contextlib.suppress(OSError):
            out.mkdir(parents=True, exist_ok=True)
            detail = e.detail if isinstance(e, StageFailed) else ""
            note.write_text(f"stage: {stage}\n{detail}\n{trace}{traceback.format_exc()}")
            message += f" (traceback: {note})"
        if rank == 0 or stage != "export":  # the export runs on rank 0 only; the others just learn of it
            where = f"rank {rank}: " if world > 1 else ""
            print(f"error: {where}rehearsal failed at {stage}: {message}", file=sys.stderr)
        return 2

    elapsed = time.perf_counter() - started
    if rank == 0:
        result = forecast(full, probe, done, peak)
        (out / "rehearsal.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(summary(result, out, world, elapsed), flush=True)
    if world > 1:
        torch.distributed.barrier()
    return 0
