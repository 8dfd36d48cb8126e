"""Supervised fine-tuning of PaddleOCR-VL on manga text crops (JSONL from prepare_manga109_data.py).

    python sft_paddleocr_vl.py --model_path PaddlePaddle/PaddleOCR-VL --data_dir ./data/manga109s \
        --output_dir ./sft_output --bf16 --gradient_checkpointing ...      (train.sh sets the defaults)

What differs from a plain Trainer run, and why:
- precision fp32_master (default): fp32 weights + bf16 autocast, so lr-2e-5 updates are not rounded away
  as they are when AdamW steps bf16 weights directly. bf16_lean: bf16 weights for 12 GB cards, stepped by
  torch-optimi's AdamW with Kahan summation, which keeps the low bits an update would lose.
- loss = summed cross-entropy over answer tokens / answer tokens in the whole accumulated batch (across
  micro-batches and ranks), and logits are computed only where the next token is an answer token.
- evaluation adds CER and exact match from greedy generation on a capped val subset; best checkpoint by CER.
- a non-finite loss stops the run naming the step, before anything is saved.
- --lora_r R trains low-rank adapters (PEFT) on the frozen base instead; the final model is merged into a
  plain checkpoint, the adapter kept in OUTPUT_DIR/adapter (ocr_lora.py).
- a memory plan (weights, gradients, optimizer state, activation estimate per mode) is logged before the
  weights are loaded; --print_memory_plan prints it and exits (memory_plan.py).
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from custom_collator import (
    OCRCollator,
    OverlongError,
    answer_ids,
    answer_tokens_line,
    configure_image_size,
    logits_positions,
    whitespace_start,
)
from export_model import ExportError, export_model, write_base
from ocr_dataset import DatasetError, OCRDataset, RecordCrops, mixed_train_dataset, spread_sample
from ocr_lora import (
    ADAPTER_DIR,
    DEFAULT_DROPOUT,
    LoraError,
    add_lora,
    is_lora,
    load_adapter_weights,
    merge_lora,
)
from ocr_metrics import cer_metrics
from ocr_model import (
    CheckedModel,
    ModelLoadError,
    generate_texts,
    load_config_and_processor,
    load_model_and_processor,
    workers_fork,
)
from sample_lengths import SUMMARY_FILE, SplitLengths, check_fits, filter_split, image_tokens, write_summary

logger = logging.getLogger("sft")


@dataclass
class ModelArguments:
    model_path: str = field(
        default="PaddlePaddle/PaddleOCR-VL", metadata={"help": "Hub id or local folder of the model to tune."}
    )
    precision: str = field(
        default="fp32_master",
        metadata={
            "help": "fp32_master: fp32 weights + bf16 autocast (weights, grads and AdamW state alone take "
            "~14.5 GB for the 0.9B model). bf16_lean: bf16 weights + Kahan-summed AdamW (~9 GB). With "
            "--lora_r: the frozen base's dtype (the adapters are fp32 either way).",
            "choices": ["fp32_master", "bf16_lean"],
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank: train rank-R adapters on the frozen base instead of every weight (0: full "
            "fine-tuning). The final model in output_dir is merged (a plain checkpoint); the adapter is "
            "kept in output_dir/adapter."
        },
    )
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA scale numerator: updates are scaled by alpha/r (default 2*r)."}
    )
    lora_dropout: float = field(default=DEFAULT_DROPOUT, metadata={"help": "Dropout on the adapters' input."})
    lora_targets: str = field(
        default="language",
        metadata={
            "help": "Layers that get adapters, comma-separated: language (decoder attention + MLP "
            "projections), vision (vision encoder attention + MLP), projector (vision-to-text MLP)."
        },
    )
    print_memory_plan: bool = field(
        default=False,
        metadata={
            "help": "Print the memory plan for this run's batch and data (weights, gradients, optimizer "
            "state, activation estimate; fp32_master, bf16_lean and lora) and exit without loading the "
            "weights. Every run logs it at start."
        },
    )
    rehearse: bool = field(
        default=False,
        metadata={
            "help": "Rehearse this run before the long one: its exact settings for a few steps on a small "
            "sample of every split (the longest crops included), in output_dir/rehearsal, through every "
            "stage (evaluation with generation, checkpoint save, resume, best-model load, export); then "
            "print the full run's steps, dropped crops, memory, s/step and projected time and exit (2 naming "
            "the stage that failed). See rehearsal.py."
        },
    )
    attn_implementation: str | None = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa, eager or flash_attention_2."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model repo (not needed: transformers>=5)."}
    )
    reset_optimizer_on_resume: bool = field(
        default=False,
        metadata={
            "help": "On resume, load the checkpoint's weights and learning-rate schedule but start the "
            "optimizer state (Adam's moments, bf16_lean's Kahan buffers) fresh. Needed to resume a "
            "checkpoint saved with another precision or optimizer (its run_setup.json says which), e.g. one "
            "made with fp32_master on a large GPU resumed with bf16_lean on a 12 GB card: that state does "
            "not fit."
        },
    )


@dataclass
class DataArguments:
    data_dir: str = field(
        default="./data/manga109s",
        metadata={
            "help": "Output folder of prepare_manga109_data.py, or several separated by spaces, each "
            "optionally FOLDER:WEIGHT (e.g. './data/manga109s ./data/synth_lines:0.5'): train samples are "
            "drawn from all by weight (a weight is a share of the samples; the first folder's crops each "
            "appear once per epoch); val/test from the first only. Counts: log, OUTPUT_DIR/data_mix.json."
        },
    )
    max_length: int = field(
        default=1536,
        metadata={
            "help": "Longest sample in tokens (prompt + image tokens + answer). Train and val crops over it "
            "are left out before training (counted per split in the log and in OUTPUT_DIR/"
            + SUMMARY_FILE + "); test crops are counted."
        },
    )
    on_overlong: str = field(
        default="drop",
        metadata={
            "help": "Crops over --max_length in train or val: drop (counted, logged) or error (stop at "
            "start, before any step).",
            "choices": ["drop", "error"],
        },
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batches to a multiple."})
    min_pixels: int | None = field(
        default=None, metadata={"help": "Image min pixels (default: the checkpoint's processor config)."}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "Image max pixels (default: the checkpoint's processor config)."}
    )
    augment: bool = field(default=False, metadata={"help": "Light contrast/brightness/padding jitter."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N train crops."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Val crops for the eval loss (default all), spread over the val books like the CER "
                  "sample."},
    )
    eval_generation_samples: int = field(
        default=200,
        metadata={
            "help": "Val crops decoded for CER / exact match at each eval (0: off): drawn once with the "
            "seed, spread over every val book as evenly as the count allows (as evaluate_model.py "
            "--num_samples); ids in OUTPUT_DIR/eval_sample_ids.json."
        },
    )
    eval_base: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the base model at step 0 (val loss and CER before any update), so the curves "
            "start at the base; a warning at the end if the best checkpoint is not better. Skipped on resume."
        },
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Batch size of eval generation."})
    generation_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Token cap of eval generation (default: each crop's own, from its size, as "
                  "evaluate_model.py)."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch crops of similar token length together (less padding when batch > 1). Off by "
            "default: on the synthetic demo data, length-homogeneous batches stopped the tiny model "
            "from learning to read."
        },
    )
    log_sample_ids: bool = field(
        default=False,
        metadata={
            "help": "Write the ids of the crops each rank trained on to OUTPUT_DIR/sample_ids_rank<r>.json "
            "(checks sharding; right with any --dataloader_num_workers)."
        },
    )


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, file-size limit); the half-written one is removed."""


class RunComplete(Exception):  # noqa: N818 - not an error: a rerun of a finished run
    """A rerun of a run whose final model is already in its output folder; the message says where."""


def answer_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, object]:
    """Cross-entropy summed over answer tokens / answer tokens in the whole accumulated batch.

    Logits are computed only at positions whose next token is labelled: for a crop that is ~20 of ~220
    positions, which skips most of the 103k-vocabulary projection. OCRCollator finds those positions in the
    loader workers (`logits_to_keep`), so the step has no host sync here. Without `num_items_in_batch`
    (eval) the loss is the mean over this batch's answer tokens, identical to the model's own loss.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = inputs.pop("logits_to_keep", None)
    if keep is None:  # a batch not built by OCRCollator: the same positions, found here (a host sync)
        keep = logits_positions(labels)
    targets = labels[:, 1:]
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    loss = F.cross_entropy(
        outputs.logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100, reduction="sum"
    )
    return loss / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()), outputs


def lean_optimizer(
    lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> tuple[type, dict]:
    """bf16_lean's optimizer as (class, kwargs): torch-optimi's AdamW with Kahan summation, which keeps the
    low bits that stepping bf16 weights would round away. Betas/eps are passed because optimi's defaults
    differ from Trainer's."""
    import optimi

    return optimi.AdamW, {"lr": lr, "betas": betas, "eps": eps, "kahan_sum": True}


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length grouping whose shuffle depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class TerminalEvalBar(ProgressCallback):
    """transformers' progress bars, with the evaluation bar only on a terminal. In a log file (train.sh
    2>&1 | tee, a batch job) the nested bar's cursor-up escapes and carriage returns landed in the middle of
    the evaluation dicts; the training bar and the dicts stay as they were."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if sys.stderr.isatty():
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


class BF16Trainer(Trainer):
    """Trainer with answer-token-weighted loss, generation metrics, length grouping and a NaN guard."""

    def __init__(
        self,
        *args,
        lengths: list[int] | None = None,
        gen_dataset: OCRDataset | None = None,
        data_args: DataArguments | None = None,
        base_model: str | None = None,
        run_setup: dict | None = None,
        fresh_optimizer: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.base_model = base_model
        self.run_setup = run_setup  # written into every checkpoint (resume_notes reads it back)
        self.fresh_optimizer = fresh_optimizer  # --reset_optimizer_on_resume
        self.lengths = lengths
        self.gen_dataset = gen_dataset
        self.data_args = data_args
        self.trained_index: list[torch.Tensor] = []  # --log_sample_ids: dataset indices, read out at the end
        self.add_callback(PercentMetrics())

    def _prepare_inputs(self, inputs: dict) -> dict:
        # The collator runs in loader workers, whose state never comes back: the indices ride in the batch.
        index = inputs.pop("sample_index", None)
        if index is not None and self.model.training and self.data_args and self.data_args.log_sample_ids:
            self.trained_index.append(index)  # kept as a tensor: reading it now would wait for the GPU
        return super()._prepare_inputs(inputs)

    def trained_ids(self) -> list:
        records = self.train_dataset.records
        index = torch.cat(self.trained_index).tolist() if self.trained_index else []
        return [records[i]["id"] for i in index]

    def _load_weights(self, path: str, model=None) -> None:
        # Trainer reads checkpoint files with their raw key names, but transformers 5 saves PaddleOCR-VL in
        # the release's key layout (mlp_AR.*, visual.*, model.*): resuming would silently keep the fresh
        # weights. from_pretrained applies the key mapping; strict loading proves every tensor arrived.
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if is_lora(target):  # a LoRA checkpoint holds only the adapter (the base is frozen)
            load_adapter_weights(target, path)
            return
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(path, config=target.config, dtype=dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_weights(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.fresh_optimizer:
            return super()._load_optimizer_and_scheduler(checkpoint)
        # --reset_optimizer_on_resume: the schedule only; optimizer.pt is never read, so every optimizer
        # initialises its state at the first step (optimi's AdamW: moments and Kahan buffers; its step too).
        path = Path(checkpoint) / SCHEDULER_NAME
        if path.is_file():
            self.lr_scheduler.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            # optimizer.pt would also have restored each group's lr as of the checkpoint; the scheduler sets
            # it only at its next step(), so the first step would otherwise use the lr of step 0 (0 in warmup)
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
                group["lr"] = lr

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every checkpoint (and the final model) names its base: export_model.py needs no --base for it.
        super()._save(output_dir, state_dict)
        if self.base_model and self.args.should_save:
            write_base(output_dir or self.args.output_dir, self.base_model)

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            # The record goes in first: trainer_state.json, written last, stays the checkpoint's commit mark.
            if self.run_setup is not None and self.args.should_save:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RUN_SETUP_FILE).write_text(json.dumps(self.run_setup, indent=1) + "\n")
            super()._save_checkpoint(model, trial)
        except Exception as e:  # safetensors, torch.save and open() each report a failed write their own way
            why = write_failure(e, folder)
            if why is None:
                raise
            # trainer_state.json is written last, so RESUME=auto already skips this folder; removing it
            # frees its space for the rerun and leaves no debris
            shutil.rmtree(folder, ignore_errors=True)
            last = latest_complete_checkpoint(str(folder.parent)) or "none yet"
            raise CheckpointWriteError(
                f"{why}; the half-written {folder.name} was removed, and the last complete checkpoint is "
                f"{last}: free some space (or raise the limit) and rerun the same command, which continues "
                "from it"
            ) from None

    def _save_rng_state(self, output_dir: str) -> None:
        # Every rank writes its own rng_state_<rank>.pth here; rank 0 writes trainer_state.json right after.
        # Waiting for all ranks first makes trainer_state.json the checkpoint's commit mark: if it exists,
        # every file of every rank does (latest_complete_checkpoint relies on this after a kill -9).
        super()._save_rng_state(output_dir)
        self.accelerator.wait_for_everyone()

    def _load_best_model(self) -> None:
        # Every rank gets here under the same condition (the state is identical on all ranks), so this
        # barrier pairs up; it lets no rank read the best checkpoint before rank 0 has written all of it.
        self.accelerator.wait_for_everyone()
        logger.info("loading best checkpoint %s (%s)", self.state.best_model_checkpoint,
                    metric_text(self.args.metric_for_best_model, self.state.best_metric))
        self._load_weights(self.state.best_model_checkpoint)

    def _get_train_sampler(self, *args, **kwargs):
        # Batches of similar length waste less padding; the lengths come from JSONL sizes, no decoding.
        group = self.data_args is not None and self.data_args.group_by_length
        if group and self.args.per_device_train_batch_size > 1 and self.lengths is not None:
            return EpochLengthGroupedSampler(
                self.args.train_batch_size, self.lengths, self.args.data_seed or self.args.seed
            )
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = answer_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count spans all ranks; DDP averages grads
        self._record_nonfinite(loss)
        if not model.training:  # an eval loss is checked at once: it could otherwise pick the best checkpoint
            self.raise_if_nonfinite()
        return (loss, outputs) if return_outputs else loss

    # The NaN guard. Reading the loss on the host every step (`if not torch.isfinite(loss)`) would stall the
    # GPU each step, so the first non-finite loss is recorded on the device (step, epoch, value) and read
    # only where the Trainer syncs or writes anyway: at logging, before evaluation, before a checkpoint is
    # saved and before training ends (the final model is saved after that). The run stops naming the step.
    _nonfinite: torch.Tensor | None = None  # (step, epoch, loss) of the first non-finite loss; step -1: none

    def _record_nonfinite(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if self._nonfinite is None:
            self._nonfinite = torch.full((3,), -1.0, device=loss.device)
        # full_like fills on the device: no host-to-device copy, no sync
        step, epoch = self.state.global_step, self.state.epoch or 0
        now = torch.stack((torch.full_like(loss, step), torch.full_like(loss, epoch), loss))
        first = ~torch.isfinite(loss) & (self._nonfinite[0] < 0)
        self._nonfinite = torch.where(first, now, self._nonfinite)

    def raise_if_nonfinite(self) -> None:
        """Raise NonFiniteLossError for the earliest non-finite loss of any rank (one host sync). Every rank
        calls this at the same points, so all stop together instead of leaving the others in a collective."""
        if self._nonfinite is None:
            return
        records = self.accelerator.gather(self._nonfinite[None]).cpu()
        bad = records[records[:, 0] >= 0]
        if len(bad):
            step, epoch, value = bad[bad[:, 0].argmin()].tolist()
            raise NonFiniteLossError(
                f"loss is {value} at step {int(step)} (epoch {epoch:.3f}); stopping before the weights are "
                "saved. Try a lower --learning_rate or check the data."
            )

    def _maybe_log_save_evaluate(self, *args, **kwargs) -> None:
        if self.control.should_log or self.control.should_evaluate or self.control.should_save:
            self.raise_if_nonfinite()
        super()._maybe_log_save_evaluate(*args, **kwargs)

    def _finalize_training(self, *args, **kwargs):
        self.raise_if_nonfinite()  # before loading the best checkpoint and before main saves the model
        return super()._finalize_training(*args, **kwargs)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
        if self.gen_dataset is not None and len(self.gen_dataset):
            generated = self.generation_metrics()
            for k, v in generated.items():
                output.metrics[f"{metric_key_prefix}_{k}"] = v
            if self.is_world_process_zero():  # the metrics dict the Trainer prints carries no unit
                logger.info("step %d: %s, %s (%d val crops, greedy)", self.state.global_step,
                            metric_text("cer", generated["cer"]),
                            metric_text("exact_match", generated["exact_match"]), len(self.gen_dataset))
        return output

    def generation_metrics(self) -> dict[str, float]:
        from accelerate.utils import gather_object

        ds, rank, world = self.gen_dataset, self.args.process_index, self.args.world_size
        mine = list(range(rank, len(ds), world))  # each rank decodes its share, results are gathered
        model = self.accelerator.unwrap_model(self.model)
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.args.bf16 and torch.cuda.is_available()
        ):
            # --dataloader_num_workers: the user's budget of loader processes (the training loader's own
            # workers only wait on a full prefetch queue meanwhile).
            preds = generate_texts(
                model,
                self.processing_class,
                RecordCrops([ds.records[i] for i in mine], ds.path),
                batch_size=self.data_args.generation_batch_size,
                max_new_tokens=self.data_args.generation_max_new_tokens,
                # spawned workers re-import torch at every evaluation: only where they fork
                num_workers=self.args.dataloader_num_workers if workers_fork() else 0,
            )
        pairs = gather_object([(p, ds.records[i]["text"]) for p, i in zip(preds, mine, strict=True)])
        m = cer_metrics([p for p, _ in pairs], [r for _, r in pairs], "none")
        nows = cer_metrics([p for p, _ in pairs], [r for _, r in pairs], "nows")
        # percent, as evaluate_model.py and the docs give CER and exact match (the order, and so the best
        # checkpoint, is the same in either unit)
        return {
            "cer": 100 * m["cer"],
            "cer_mean": 100 * m["cer_mean"],
            "exact_match": 100 * m["exact_match"],
            "cer_nows": 100 * nows["cer"],
        }


PERCENT_METRICS = ("cer", "cer_mean", "exact_match", "cer_nows")  # generation_metrics: in percent
METRIC_NAMES = {"cer": "CER", "cer_mean": "mean CER", "exact_match": "exact match",
                "cer_nows": "CER (no spaces)"}


def metric_text(name: str | None, value: float | None) -> str:
    """'val CER 12.34 %' / 'val loss 0.4321': an eval metric with its unit, for the log lines."""
    name = (name or "loss").removeprefix("eval_")
    if value is None:
        return f"val {METRIC_NAMES.get(name, name)} -"
    if name in PERCENT_METRICS:
        return f"val {METRIC_NAMES[name]} {value:.2f} %"
    return f"val {METRIC_NAMES.get(name, name)} {value:.4f}"


class PercentMetrics(TrainerCallback):
    """Checkpoints written before CER and exact match went to percent hold them (and best_metric) as
    fractions: resumed as they are, a new 14.0 (%) never beats a best of 0.15 (15 %), so the best-model load
    and SAVE_TOTAL_LIMIT would keep the older, worse checkpoint. Such a state is converted when training
    begins; states saved since carry MARK (in trainer_state.json's stateful_callbacks, saved as it is)."""

    MARK = "cer_in_percent"

    def on_train_begin(self, args, state, control, **kwargs):
        if self.MARK in state.stateful_callbacks:
            return
        state.stateful_callbacks[self.MARK] = {"args": {}, "attributes": {}}  # ExportableState's layout
        for entry in state.log_history:  # empty in a fresh run: the step-0 evaluation comes after this
            for name in PERCENT_METRICS:
                if f"eval_{name}" in entry:
                    entry[f"eval_{name}"] *= 100
        if (args.metric_for_best_model or "").removeprefix("eval_") in PERCENT_METRICS and state.best_metric:
            state.best_metric *= 100


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


def finished_run(args: TrainingArguments, n_train: int) -> str | None:
    """What to say instead of training when the checkpoint to resume from is at the run's last optimizer step
    and the final model is already saved (finish_run writes OUTPUT_DIR/trainer_state.json after it); None
    otherwise. Raising EPOCHS or MAX_STEPS moves the last step, and the run trains on from the checkpoint."""
    from rehearsal import optimizer_steps  # the Trainer's own count of steps

    if not args.resume_from_checkpoint:
        return None
    try:
        state = json.loads((Path(args.resume_from_checkpoint) / "trainer_state.json").read_text())
        final = json.loads((Path(args.output_dir) / "trainer_state.json").read_text())
        step = state["global_step"]
    except (OSError, ValueError, KeyError):
        return None
    total = optimizer_steps(n_train, args)[0]
    if step < total or final.get("global_step", -1) < total:
        return None
    best, best_metric = final.get("best_model_checkpoint"), final.get("best_metric")
    if best_metric and PercentMetrics.MARK not in final.get("stateful_callbacks", {}) and (
            (args.metric_for_best_model or "").removeprefix("eval_") in PERCENT_METRICS):
        best_metric *= 100  # saved while CER was a fraction
    metric = metric_text(args.metric_for_best_model, best_metric)
    return (f"the run is already complete at step {step} of {total}: its model is in {args.output_dir}"
            + (f" (from {Path(best).name}, the best by {metric})" if best else "")
            + ". To train further, raise EPOCHS or set MAX_STEPS (--num_train_epochs, --max_steps); "
            "RESUME=none starts over")


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


def base_verdict(state: Any, args: TrainingArguments) -> str | None:
    """A warning when the best checkpoint is not better than the base model measured at step 0."""
    key = f"eval_{args.metric_for_best_model}"
    base = next((h[key] for h in state.log_history if h.get("step") == 0 and key in h), None)
    best = state.best_metric
    if base is None or best is None:
        return None
    worse = best <= base if args.greater_is_better else best >= base
    if not worse:
        return None
    name = args.metric_for_best_model
    return (
        f"the best checkpoint's {metric_text(name, best)} is not better than the base model's at step 0 "
        f"({metric_text(name, base).removeprefix('val ')}): fine-tuning did not help on val. Check the "
        "learning rate, the data and the prompt before a longer run; the base model itself may be the better "
        "choice."
    )


def plot_curves(log_history: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(log_history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(log_history: list[dict]) -> Any:
    """training_curves.png: train and val loss, and val CER in percent (as generation_metrics logs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h) for h in log_history if "eval_loss" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax1.plot([s for s, _ in evals], [h["eval_loss"] for _, h in evals], "o-", label="val loss")
        cer = [(s, h["eval_cer"]) for s, h in evals if "eval_cer" in h]
        if cer:
            ax2.plot(*zip(*cer, strict=True), "o-", color="C3", label="val CER (%)")
            ax2.set_ylim(bottom=0)
    ax1.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax2.set(xlabel="optimizer step", ylabel="CER (%)", title="val CER (greedy), %")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no val CER without generation
            ax.legend()
    fig.tight_layout()
    return fig


# transformers 5.23 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs): the old
# names warn (FutureWarning, gone in v6), and 5.18 to 5.22 know only them. Flags use this version's name.
CHECKPOINTING = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                     if n in {f.name for f in dataclasses.fields(TrainingArguments)})


def checkpointing_flags(argv: list[str]) -> list[str]:
    """--gradient_checkpointing[_kwargs][=X] under this transformers version's name (train.sh, users and the
    memory plan's advice say --gradient_checkpointing, which every 5.x takes)."""
    old = re.compile(r"^--gradient_checkpointing(?=$|=|_kwargs($|=))")
    return [old.sub(f"--{CHECKPOINTING}", a) for a in argv]


def activation_checkpointing(args: TrainingArguments) -> bool:
    return bool(getattr(args, CHECKPOINTING))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = checkpointing_flags(list(sys.argv[1:] if argv is None else argv))
    # The Trainer's NaN/inf filter reads every step's loss on the host (a GPU sync); the NaN guard stops the
    # run on a non-finite loss anyway. A flag given on the command line comes later and wins.
    argv = ["--logging_nan_inf_filter", "false", *argv]
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.accelerator.is_available():
        # Without --use_cpu, accelerate starts a gloo group on a GPU-less machine but sets distributed_type
        # NO: no DDP wrapping (ranks train apart), and every barrier and wait_for_everyone is a no-op, so a
        # rank could read a checkpoint rank 0 was still writing. MULTI_CPU is real DDP over gloo. Flags given
        # on the command line come later and win.
        argv = ["--use_cpu", "true", "--ddp_backend", "gloo", *argv]
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    if launched and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise SystemExit(
            f"error: launched as {os.environ['WORLD_SIZE']} processes but the Trainer is not in distributed "
            f"mode ({args.parallel_mode}); ranks would train apart and race on the output folder"
        )
    refuse_data_parallel(args)  # before any data or weights are read
    return model_args, data_args, args


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


def refuse_data_parallel(args: TrainingArguments) -> None:
    """Exit 2 with one line where the Trainer would wrap the model in nn.DataParallel: one process that sees
    several GPUs (TrainingArguments sets n_gpu = torch.cuda.device_count() outside torchrun). DataParallel
    splits every tensor along dim 0, and pixel_values holds all images' patches back to back, so the split
    cuts through images and the first step crashes."""
    if args.n_gpu > 1:
        print(
            f"error: {args.n_gpu} GPUs are visible but this is one process: the Trainer would use "
            "nn.DataParallel, which splits image patches across images. Run `bash train.sh` "
            "(NUM_GPUS=auto launches one process per GPU through torchrun), or `NUM_GPUS=1`/"
            "`CUDA_VISIBLE_DEVICES=0` for one GPU",
            file=sys.stderr,
        )
        raise SystemExit(2)


class TrainData(NamedTuple):
    """Everything about the data and the checkpoint that needs no weights."""

    train: OCRDataset
    val: OCRDataset | None
    mix: list[dict]
    checked: CheckedModel
    splits: list[SplitLengths]  # train, then val and test where present
    answer_tokens: str = ""  # the first train answer's labelled tokens (check_answer_tokens)


class AnswerTokenError(DatasetError):
    """A train answer's labels would start with a whitespace-only token."""


def check_answer_tokens(tokenizer: Any, records: list[dict]) -> str:
    """One line with the first train answer's labelled ids and pieces on this (the user's) tokenizer, after
    checking every train answer: raises AnswerTokenError if any label starts with a whitespace-only piece, or
    with a piece that merges in a space ("▁O"); answer_ids drops the whitespace a text itself starts with.

    The prompt ends in its own "▁" (v1) or "\n" (1.5/1.6); a label starting with "▁" would teach the model
    to emit a second space there, on every crop if the tokenizer puts it before each text (add_prefix_space,
    which answer_ids turns off: this is the check that it did, on the files the run really loads)."""
    texts = [r["text"] for r in records]
    labels = answer_ids(tokenizer, texts)
    firsts = {ids[0] for ids in labels}  # a few thousand distinct first tokens: each checked once
    blank = {i for i in firsts if whitespace_start(tokenizer, [i])}
    # a space merged into the first piece ("▁O" for "OK") is as wrong (answer_ids drops a text's own)
    spaced = {i for i in firsts if str(tokenizer.convert_ids_to_tokens(i)).startswith("▁")}
    bad = [k for k, ids in enumerate(labels) if ids[0] in blank or ids[0] in spaced]
    if bad:
        k = bad[0]
        raise AnswerTokenError(
            f"{len(bad)} of {len(texts)} train answers would be labelled starting with a whitespace-only "
            f"token or a space the text does not have, the first {records[k].get('id', k)!r} {texts[k]!r} -> "
            f"pieces {tokenizer.convert_ids_to_tokens(labels[k])}: the model would learn to emit a space "
            "after the prompt's own; the tokenizer puts a space before the text that answer_ids did not "
            "remove"
        )
    return answer_tokens_line(tokenizer, texts[0])


def train_data(
    model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, decode: bool = True
) -> TrainData:
    """Read the splits and the checked config/processor, filter every split by one length rule (the owner:
    sample_lengths), and (decode) leave out crops that cannot be decoded (drop_unreadable). Raises
    DatasetError / ModelLoadError."""
    # data first: a missing split should fail before minutes of downloading and loading weights
    train_ds, mix = mixed_train_dataset(
        data_args.data_dir, seed=args.data_seed or args.seed, augment=data_args.augment,
        max_samples=data_args.max_train_samples,
    )
    if not len(train_ds):
        raise DatasetError(f"{Path(mix[0]['folder']) / 'train.jsonl'} has no samples")
    logger.info("train samples per folder: %s", ", ".join(f"{m['folder']}: {m['drawn']}" for m in mix))
    data = Path(mix[0]["folder"])  # val/test: the first folder only
    splits = {name: data / f"{name}.jsonl" for name in ("val", "test")}
    present = {name: OCRDataset(p) for name, p in splits.items() if p.is_file() and p.stat().st_size > 0}
    checked = load_config_and_processor(model_args.model_path, trust_remote_code=model_args.trust_remote_code)
    configure_image_size(checked.processor, data_args.min_pixels, data_args.max_pixels)
    limit, processor = data_args.max_length, checked.processor
    answer_tokens = check_answer_tokens(processor.tokenizer, train_ds.records)
    logger.info("%s", answer_tokens)
    results = [filter_split("train", train_ds, processor, limit, augment=data_args.augment)]
    if "val" in present:
        results.append(filter_split("val", present["val"], processor, limit))
    check_fits(results, data_args.on_overlong)
    if "test" in present:  # not used in training: counted so the user knows what evaluation will meet
        results.append(filter_split("test", present["test"], processor, limit, drop=False))
    for r in results:
        (logger.warning if r.dropped or r.padded else logger.info)("%s", r.line(used=r.split != "test"))
    if not results[0].lengths:
        raise DatasetError(f"every train sample is longer than --max_length {limit}")
    if "val" in present and not len(present["val"]):
        logger.warning("every val crop is over --max_length %d: no evaluation", limit)
        del present["val"]
    data = TrainData(train_ds, present.get("val"), mix, checked, results, answer_tokens)
    if decode:  # by this process alone (the rehearsal's rank 0); build_trainer shares it among the ranks
        drop_unreadable(data)
    return data


def unreadable(path: str) -> str | None:
    """Why the crop at `path` cannot be decoded (None: it can). A full decode, as training does: PIL's
    verify() takes half the time but misses a truncated JPEG and refuses a PNG that lacks only its end mark
    (docs/training.md#faults)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        return str(e) or type(e).__name__
    return None


def drop_unreadable(data: TrainData, rank: int = 0, world: int = 1) -> None:
    """Decode every train and val crop before training: one truncated PNG would otherwise stop the run when
    its batch comes up, hours in (or go unnoticed by a short run). Unreadable crops are left out (with their
    lengths) and counted in one warning per split naming the first; none readable is a DatasetError."""
    for split, ds in (("train", data.train), ("val", data.val)):
        if ds is None:
            continue
        keep = readable(split, ds, rank, world)
        if not all(keep):
            ds.records = [r for r, k in zip(ds.records, keep, strict=True) if k]
            lengths = next(r for r in data.splits if r.split == split)
            lengths.lengths = [n for n, k in zip(lengths.lengths, keep, strict=True) if k]


def readable(split: str, ds: OCRDataset, rank: int = 0, world: int = 1) -> list[bool]:
    """Per record of `ds`: can its crop be decoded? Warns once naming the first that cannot. Each of the
    `world` ranks decodes every world-th crop and all get the whole verdict: the ranks keep the same crops
    (DDP's sampler shards by index and length), and 8 ranks of a node don't each decode all 150k."""
    from concurrent.futures import ThreadPoolExecutor

    # PIL decodes with the GIL released; each process (rank) of this node checks with its share of the CPUs
    # it may use (a Slurm or container job may be given fewer than the machine has)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        mine = list(pool.map(unreadable, [r["image_path"] for r in ds.records[rank::world]]))
    shares = [mine]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    why: list[str | None] = [None] * len(ds.records)
    for r, share in enumerate(shares):
        why[r::world] = share
    bad = [(r, w) for r, w in zip(ds.records, why, strict=True) if w is not None]
    logger.info("%s: %d crops decoded in %.1f s (%d on this rank, %d threads)", split, len(ds.records),
                time.monotonic() - started, len(mine), threads)
    if bad:
        first, reason = bad[0]
        where = f"{first.get('_source', ds.path)}:{first['_line']} ({first['image_path']}: {reason})"
        if len(bad) == len(ds.records):
            raise DatasetError(f"{split}: none of the {len(bad):,} crops can be decoded, e.g. {where}")
        logger.warning("%s: %d of %d crops cannot be decoded and are left out, e.g. %s", split, len(bad),
                       len(ds.records), where)
    return [w is None for w in why]


def run_memory_plan(
    model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, data: TrainData
) -> str:
    """The memory plan for a micro-batch of the longest train sample (peak memory follows the longest)."""
    from memory_plan import format_plan, gpu_memory_bytes, memory_plan

    checked, ds, lengths = data.checked, data.train, data.splits[0].lengths
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    multiple = data_args.pad_to_multiple_of or 1
    rows = memory_plan(
        checked.config,
        batch_size=args.per_device_train_batch_size,
        seq_len=-(-lengths[longest] // multiple) * multiple,
        image_tokens=image_tokens(checked.processor, *ds.image_sizes()[longest], augment=data_args.augment),
        gradient_checkpointing=activation_checkpointing(args),
        bf16_autocast=args.bf16,
        lora_r=model_args.lora_r,
        lora_targets=model_args.lora_targets,
        lora_precision=model_args.precision,
        lora_dropout=model_args.lora_dropout,
    )
    chosen = "lora" if model_args.lora_r else model_args.precision
    return format_plan(rows, chosen, gpu_memory_bytes())


def eval_datasets(
    val: OCRDataset | None, data_args: DataArguments, args: TrainingArguments
) -> tuple[OCRDataset | None, OCRDataset | None]:
    """(val set for the loss, val sample for CER): drawn once from the filtered val with the seed, spread over
    every val book (the JSONL is in title/page order: its first N crops are one book). Rank 0 writes the ids
    to eval_sample_ids.json."""
    if val is None:
        return None, None
    seed = args.data_seed or args.seed
    n_loss, n_gen = data_args.max_eval_samples, data_args.eval_generation_samples
    loss = val.with_records(spread_sample(val.records, n_loss, seed)) if n_loss is not None else val
    gen = val.with_records(spread_sample(val.records, n_gen, seed)) if n_gen > 0 else None
    if args.process_index == 0:
        ids = {"generation": [r["id"] for r in gen.records] if gen else [],
               "loss": [r["id"] for r in loss.records]}
        path = Path(args.output_dir) / "eval_sample_ids.json"
        path.write_text(json.dumps(ids, ensure_ascii=False, indent=0) + "\n")
    return loss, gen


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, callbacks=None
) -> BF16Trainer:
    """Everything up to trainer.train(); raises ModelLoadError / DatasetError / LoraError on bad input."""
    refuse_data_parallel(args)  # again for callers that build TrainingArguments without parse_args
    check_output_dir(args)
    set_seed(args.seed)
    if args.resume_from_checkpoint == "auto":
        args.resume_from_checkpoint = main_process_decides(
            args, lambda: latest_complete_checkpoint(args.output_dir)
        )
    setup = run_setup(model_args, args)
    check_resume(args, setup, model_args.reset_optimizer_on_resume)
    args.remove_unused_columns = False  # the collator needs image/text, which forward() doesn't take
    if not torch.accelerator.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns per loader otherwise
    if activation_checkpointing(args) and getattr(args, f"{CHECKPOINTING}_kwargs") is None:
        setattr(args, f"{CHECKPOINTING}_kwargs", {"use_reentrant": False})

    data = train_data(model_args, data_args, args, decode=False)
    done = finished_run(args, len(data.train))  # before decoding crops or loading weights
    if done:
        raise RunComplete(done)
    n_train = len(data.train)
    drop_unreadable(data, args.process_index, args.world_size)  # every rank takes part
    done = finished_run(args, len(data.train)) if len(data.train) < n_train else None  # fewer steps now
    if done:
        raise RunComplete(done)
    train_ds, checked = data.train, data.checked
    if args.resume_from_checkpoint:
        logger.info("resume: %s", args.resume_from_checkpoint)
    else:
        logger.info("no checkpoint to resume from: starting fresh")
    out = Path(args.output_dir)
    if args.process_index == 0:
        (out / "data_mix.json").write_text(json.dumps(data.mix, indent=1) + "\n")
        write_summary(out / SUMMARY_FILE, data.splits)
        plan = run_memory_plan(model_args, data_args, args, data)
        logger.info("%s", plan)
        verdict = plan.splitlines()[-1]  # format_plan ends with "warning: ..." when the mode does not fit
        if verdict.startswith("warning:"):
            logger.warning("%s", verdict.removeprefix("warning: "))

    lean = model_args.precision == "bf16_lean"
    model, processor = load_model_and_processor(
        model_args.model_path,
        dtype=torch.bfloat16 if lean else torch.float32,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        checked=checked,
    )
    model.config.use_cache = False  # the cache is useless in training and conflicts with checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    if model_args.lora_r:
        model = add_lora(model, model_args.lora_r, model_args.lora_targets, alpha=model_args.lora_alpha,
                         dropout=model_args.lora_dropout)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "LoRA r=%d alpha=%g on %s: %.2fM trainable of %.1fM (%.2f%%)", model_args.lora_r,
            model.peft_config["default"].lora_alpha,
            model_args.lora_targets, n_train / 1e6, n_params / 1e6, 100 * n_train / n_params,
        )
        if args.ddp_find_unused_parameters is None:  # every adapter takes part in every step
            args.ddp_find_unused_parameters = False
    check_disk_space(args, model)
    eval_ds, gen_ds = eval_datasets(data.val, data_args, args)
    if eval_ds is None:
        logger.warning("no val split in %s: training without evaluation", data.mix[0]["folder"])
        args.eval_strategy, args.load_best_model_at_end = "no", False
    elif args.metric_for_best_model in (None, "cer") and gen_ds is not None:
        args.metric_for_best_model, args.greater_is_better = "cer", False
    elif args.metric_for_best_model == "cer":  # CER needs generation; fall back to the val loss
        args.metric_for_best_model, args.greater_is_better = "loss", False
    # The base on the curve: a resumed run's log history already starts with it.
    args.eval_on_start = (eval_ds is not None and data_args.eval_base and args.eval_strategy != "no"
                          and not args.resume_from_checkpoint)

    # LoRA's adapters are fp32 in both precisions: Trainer's AdamW steps them exactly
    betas = (args.adam_beta1, args.adam_beta2)
    lean_opt = lean and not model_args.lora_r
    optimizer = lean_optimizer(args.learning_rate, betas, args.adam_epsilon) if lean_opt else None
    collator = OCRCollator(
        processor,
        max_length=data_args.max_length,
        on_overlong=data_args.on_overlong,
        pad_to_multiple_of=data_args.pad_to_multiple_of,
    )
    logger.info(
        "train %d crops, val %d; %.1fM parameters, precision %s",
        len(train_ds),
        len(eval_ds) if eval_ds else 0,
        n_params / 1e6,
        model_args.precision,
    )
    trainer = BF16Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator,
        processing_class=processor,
        optimizer_cls_and_kwargs=optimizer,
        callbacks=callbacks,
        lengths=data.splits[0].lengths,
        gen_dataset=gen_ds,
        data_args=data_args,
        base_model=model_args.model_path,
        run_setup=setup,
        fresh_optimizer=bool(args.resume_from_checkpoint) and model_args.reset_optimizer_on_resume,
    )
    if trainer.pop_callback(ProgressCallback):  # absent with --disable_tqdm
        trainer.add_callback(TerminalEvalBar)
    return trainer


def save_final_model(trainer: BF16Trainer, base: str, output_dir: str) -> bool:
    """Save the final model in output_dir as a drop-in replacement for the base (export_model.py: the base's
    files and key layout, plus the tensors transformers does not load). A LoRA run saves its adapter in
    output_dir/adapter and the merged model in output_dir. Rank 0 writes while the other ranks wait for its
    outcome; False on every rank (the error printed once) if it failed."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = is_lora(model)
    trainer.save_model(os.path.join(output_dir, ADAPTER_DIR) if lora else output_dir)

    def export() -> str | None:
        try:
            if lora:  # merged on the CPU in fp32: the GPU may not hold an fp32 copy of the base
                merged = merge_lora(model.to("cpu"))
                merged.save_pretrained(output_dir)
                trainer.processing_class.save_pretrained(output_dir)
            export_model(output_dir, base, output_dir)
            write_base(output_dir, base)  # a LoRA run's merged model was not saved through the trainer
        except (ExportError, OSError) as e:
            return str(e)
        return None

    error = main_process_decides(trainer.args, export)
    if error is not None and trainer.is_world_process_zero():
        print(
            f"error: could not lay out {output_dir} like the base {base}: {error}\nthe fine-tuned weights "
            "are saved there as transformers writes them; after fixing, run: python export_model.py "
            f"{output_dir} --base {base} --out DIR",
            file=sys.stderr,
        )
    return error is None


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    finally:
        # Each rank tears its process group down itself: left to interpreter exit, gloo's threads can still
        # run while their objects are destroyed, which aborts the rank ("terminate called without an active
        # exception", once in 7 two-process rehearsals here) and torchrun then fails the whole run.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(argv: list[str] | None = None) -> int:
    model_args, data_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if model_args.print_memory_plan:
            data = train_data(model_args, data_args, args, decode=False)  # sizes come from the JSONL
            print(run_memory_plan(model_args, data_args, args, data))
            return 0
        if model_args.rehearse:  # names the stage that failed itself, and exits 2
            from rehearsal import rehearse

            return rehearse(sys.argv[1:] if argv is None else argv)
        trainer = build_trainer(model_args, data_args, args)
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    except RunComplete as done:
        if args.process_index == 0:
            print(done)
        return 0
    except (ModelLoadError, DatasetError, NonFiniteLossError, LoraError, OverlongError,
            CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # typically a full disk while saving a checkpoint
        last = latest_complete_checkpoint(args.output_dir)
        print(f"error: {e}; the last complete checkpoint is {last}: rerun the same command once the problem "
              "is fixed (RESUME=auto continues from it)", file=sys.stderr)
        return 2
    return 0 if finish_run(trainer, model_args, data_args, args) else 2


def finish_run(
    trainer: BF16Trainer, model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments
) -> bool:
    """The end of a run (also rehearsed): the exported final model, trainer_state.json, the curves; False
    if the export failed (the error printed)."""
    # Shared files are written by rank 0 only (save_model, save_state, the curves); per-rank files carry the
    # rank in their name. The final barrier ends every rank only once the output folder is complete.
    if not save_final_model(trainer, model_args.model_path, args.output_dir):
        return False
    trainer.save_state()
    if data_args.log_sample_ids:
        ids_path = Path(args.output_dir) / f"sample_ids_rank{args.process_index}.json"
        ids_path.write_text(json.dumps(trainer.trained_ids(), ensure_ascii=False))
    if trainer.is_world_process_zero():
        plot_curves(trainer.state.log_history, Path(args.output_dir) / "training_curves.png")
        logger.info("saved model and training_curves.png to %s", args.output_dir)
        verdict = base_verdict(trainer.state, args)
        if verdict:
            logger.warning("%s", verdict)
    trainer.accelerator.wait_for_everyone()
    return True


if __name__ == "__main__":
    sys.exit(main())
