"""A training run from its arguments: the trainer built (resume resolved and checked), and its end: the final
model saved as a drop-in for the base, the curves, the verdict against the base model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from paddleocr_vl_manga.data.collator import (
    OCRCollator,
)
from paddleocr_vl_manga.data.lengths import (
    SUMMARY_FILE,
    write_summary,
)
from paddleocr_vl_manga.export.layout import ExportError, export_model, write_base
from paddleocr_vl_manga.model.loading import (
    load_model_and_processor,
)
from paddleocr_vl_manga.model.lora import (
    ADAPTER_DIR,
    add_lora,
    is_lora,
    merge_lora,
)
from paddleocr_vl_manga.model.output_vocabulary import write_output_vocabulary
from paddleocr_vl_manga.train.arguments import (
    CHECKPOINTING,
    DataArguments,
    ModelArguments,
    activation_checkpointing,
    refuse_data_parallel,
)
from paddleocr_vl_manga.train.checkpoints import (
    check_disk_space,
    check_output_dir,
    check_resume,
    latest_complete_checkpoint,
    main_process_decides,
    run_setup,
)
from paddleocr_vl_manga.train.inputs import drop_unreadable, eval_datasets, run_memory_plan, train_data
from paddleocr_vl_manga.train.trainer import (
    PERCENT_METRICS,
    BF16Trainer,
    PercentMetrics,
    TerminalEvalBar,
    lean_optimizer,
    metric_text,
    optimizer_steps,  # the Trainer's own count of steps
)

logger = logging.getLogger("sft")

class RunComplete(Exception):  # noqa: N818 - not an error: a rerun of a finished run
    """A rerun of a run whose final model is already in its output folder; the message says where."""


def finished_run(args: TrainingArguments, n_train: int) -> str | None:
    """What to say instead of training when the checkpoint to resume from is at the run's last optimizer step
    and the final model is already saved (finish_run writes OUTPUT_DIR/trainer_state.json after it); None
    otherwise. Raising EPOCHS or MAX_STEPS moves the last step, and the run trains on from the checkpoint."""

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
        output_vocabulary=data.output_vocabulary,
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
            if trainer.output_vocabulary:  # a LoRA run's went to OUTPUT_DIR/adapter
                write_output_vocabulary(output_dir, trainer.output_vocabulary)
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
