"""A persistent local OCR server: load the model once, OCR from any tool over HTTP.

    python serve.py --model_path ./runs/ft                    # http://127.0.0.1:8000 (this machine only)
    python serve.py --model_path ./runs/ft --quantize int8    # int8 on the CPU
    curl -F image=@crop.png http://127.0.0.1:8000/ocr

POST /ocr (crops, or a page and boxes), POST /v1/chat/completions (OpenAI-compatible), GET /health, and a
page at / (docs/serving.md).

The code: paddleocr_vl_manga.serve.cli (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
