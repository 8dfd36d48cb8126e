"""Evaluate a PaddleOCR-VL checkpoint on a prepared split: CER / exact match under every normalization.

    python evaluate_model.py --model_path PaddlePaddle/PaddleOCR-VL --split test
    python evaluate_model.py --model_path ./runs/ft/checkpoint-best --num_samples 500
    python evaluate_model.py --compare base/metrics.json ft/metrics.json --output_dir ./eval_output

What it does and why, and every flag: `python evaluate_model.py --help` (the module's docstring).
The code: paddleocr_vl_manga.evaluate.evaluation (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.evaluate.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
