"""A persistent local OCR server over a PaddleOCR-VL checkpoint: load the model once, OCR from any tool.

    python serve.py --model_path ./runs/ft                       # http://127.0.0.1:8000, this machine only
    python serve.py --model_path ./runs/ft --quantize int8 --port 8765
    PADDLEOCR_VL_MANGA_API_KEY=secret python serve.py --model_path ./runs/ft --host 0.0.0.0

What it does and why, and every flag: `python serve.py --help` (the module's docstring).
The code: paddleocr_vl_manga.serve.cli (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
