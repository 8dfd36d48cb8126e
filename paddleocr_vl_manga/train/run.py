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
  plain checkpoint, the adapter kept in OUTPUT_DIR/adapter (model/lora.py).
- a memory plan (weights, gradients, optimizer state, activation estimate per mode) is logged before the
  weights are loaded; --print_memory_plan prints it and exits (train/memory_plan.py).
"""

from __future__ import annotations

import logging
import sys

import torch

from paddleocr_vl_manga.data.collator import (
    OverlongError,
)
from paddleocr_vl_manga.data.dataset import (
    DatasetError,
)
from paddleocr_vl_manga.model.loading import (
    ModelLoadError,
)
from paddleocr_vl_manga.model.lora import (
    LoraError,
)
from paddleocr_vl_manga.train.arguments import parse_args
from paddleocr_vl_manga.train.build import RunComplete, build_trainer, finish_run
from paddleocr_vl_manga.train.checkpoints import CheckpointWriteError, latest_complete_checkpoint
from paddleocr_vl_manga.train.inputs import run_memory_plan, train_data
from paddleocr_vl_manga.train.trainer import NonFiniteLossError

logger = logging.getLogger("sft")


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
            from paddleocr_vl_manga.train.rehearsal import rehearse

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


if __name__ == "__main__":
    sys.exit(main())
