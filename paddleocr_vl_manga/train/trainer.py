"""The Trainer for OCR fine-tuning: loss on the answer tokens only, the bf16 optimizer, length-grouped
batches, CER by generation at each evaluation (in percent), best-model loading and checkpoint saves that are
safe across ranks."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from paddleocr_vl_manga.data.collator import (
    logits_positions,
)
from paddleocr_vl_manga.data.dataset import (
    OCRDataset,
    RecordCrops,
)
from paddleocr_vl_manga.evaluate.metrics import cer_metrics
from paddleocr_vl_manga.export.layout import write_base
from paddleocr_vl_manga.model.generation import generate_texts, workers_fork
from paddleocr_vl_manga.model.lora import (
    is_lora,
    load_adapter_weights,
)
from paddleocr_vl_manga.model.output_vocabulary import write_output_vocabulary
from paddleocr_vl_manga.train.arguments import DataArguments
from paddleocr_vl_manga.train.checkpoints import (
    RUN_SETUP_FILE,
    CheckpointWriteError,
    latest_complete_checkpoint,
    write_failure,
)

logger = logging.getLogger("sft")

class NonFiniteLossError(RuntimeError):
    pass


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
        output_vocabulary: list[int] | tuple[int, ...] = (),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.base_model = base_model
        self.run_setup = run_setup  # written into every checkpoint (resume_notes reads it back)
        self.fresh_optimizer = fresh_optimizer  # --reset_optimizer_on_resume
        self.output_vocabulary = list(output_vocabulary)  # the label tokens: every save writes them
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
        if self.output_vocabulary and self.args.should_save:  # inference restricts lm_head to these rows
            write_output_vocabulary(output_dir or self.args.output_dir, self.output_vocabulary)

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


def optimizer_steps(n_train: int, args: TrainingArguments) -> tuple[int, int]:
    """(optimizer steps of the run, per epoch) as Trainer counts them: accelerate deals batches of the
    per-device size to the processes (evened out unless drop_last), accumulation groups them into steps."""
    size, world = args.per_device_train_batch_size, args.world_size
    batches = n_train // size if args.dataloader_drop_last else math.ceil(n_train / size)
    per_rank = batches // world if args.dataloader_drop_last else math.ceil(batches / world)
    per_epoch = max(math.ceil(per_rank / args.gradient_accumulation_steps), 1)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return total, per_epoch
