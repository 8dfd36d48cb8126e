"""Evaluate a PaddleOCR-VL checkpoint on a prepared split: CER / exact match under every normalization.

    python evaluate_model.py --model_path PaddlePaddle/PaddleOCR-VL --split test
    python evaluate_model.py --model_path ./runs/ft/checkpoint-best --num_samples 500
    python evaluate_model.py --compare base/metrics.json ft/metrics.json --output_dir ./eval_output

Writes predictions.jsonl (flushed after every chunk, so a crash or Ctrl-C keeps what was produced),
then, at the end, metrics.json, summary.md and report.html (a self-contained page: tables, charts, the worst
crops with their images and character differences marked). An output folder holds one run: run.json records
its settings; the same command run again continues from the predictions already written, other settings
start the folder over (saying so), and the summary files exist only once the run is complete.
--compare of two runs also writes comparison.html (the crops the second model fixed and broke), which needs
each run's predictions.jsonl beside its metrics.json. Bad input (unknown model, broken JSONL, unreadable
image, empty split) ends with one `error: ...` line on stderr and exit code 2.

The code: paddleocr_vl_manga.evaluate.evaluation (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.evaluate.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
