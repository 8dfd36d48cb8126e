"""Export a fine-tuned checkpoint as a drop-in replacement for the base model it was trained from.

    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 [--base PaddlePaddle/PaddleOCR-VL]
    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 --gguf [--gguf_type q8_0]

What it does and why, and every flag: `python export_model.py --help` (the module's docstring).
The code: paddleocr_vl_manga.export.layout (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.export.layout import main

if __name__ == "__main__":
    sys.exit(main())
