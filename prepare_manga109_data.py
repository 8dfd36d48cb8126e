"""Manga109s release -> text-line crops + train/val/test JSONL (book-level split by default).

    python prepare_manga109_data.py --manga109_root ./Manga109s --output_dir ./data/manga109s

What it does and why, and every flag: `python prepare_manga109_data.py --help` (the module's docstring).
The code: paddleocr_vl_manga.data.manga109 (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.data.manga109 import main

if __name__ == "__main__":
    sys.exit(main())
