"""Supervised fine-tuning of PaddleOCR-VL on manga text crops (JSONL from prepare_manga109_data.py).

    python sft_paddleocr_vl.py --model_path PaddlePaddle/PaddleOCR-VL --data_dir ./data/manga109s \
        --output_dir ./sft_output --bf16 --gradient_checkpointing ...      (train.sh sets the defaults)

What it does and why, and every flag: `python sft_paddleocr_vl.py --help` (the module's docstring).
The code: paddleocr_vl_manga.train.run (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.train.run import main

if __name__ == "__main__":
    sys.exit(main())
