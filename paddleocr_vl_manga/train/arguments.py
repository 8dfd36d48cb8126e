"""The training command's arguments: the kit's own dataclasses beside transformers' TrainingArguments, parsed
in one place (the activation-checkpointing flag under the installed transformers' name)."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import ParallelMode

from paddleocr_vl_manga.data.lengths import (
    SUMMARY_FILE,
)
from paddleocr_vl_manga.data.manga109 import one_line_usage_errors
from paddleocr_vl_manga.model.lora import (
    DEFAULT_DROPOUT,
)


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
            "the stage that failed). See train/rehearsal.py."
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
    parser = one_line_usage_errors(HfArgumentParser((ModelArguments, DataArguments, TrainingArguments)))
    try:
        model_args, data_args, args, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
    except ValueError as e:  # TrainingArguments' own checks (a strategy without its steps, ...): a traceback
        parser.error(str(e).strip().splitlines()[0])
    if unknown:  # HfArgumentParser would raise a ValueError (a traceback) for these
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # torch's DataLoader and the accumulation loop raise deep inside training on these
    for name, value in (("per_device_train_batch_size", args.per_device_train_batch_size),
                        ("per_device_eval_batch_size", args.per_device_eval_batch_size),
                        ("gradient_accumulation_steps", args.gradient_accumulation_steps),
                        ("max_length", data_args.max_length)):
        if value < 1:
            parser.error(f"--{name} {value}: need a whole number of at least 1")
    if launched and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise SystemExit(
            f"error: launched as {os.environ['WORLD_SIZE']} processes but the Trainer is not in distributed "
            f"mode ({args.parallel_mode}); ranks would train apart and race on the output folder"
        )
    refuse_data_parallel(args)  # before any data or weights are read
    return model_args, data_args, args


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
