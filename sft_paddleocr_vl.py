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

The code: paddleocr_vl_manga.train.run (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.train.run import main

if __name__ == "__main__":
    sys.exit(main())
