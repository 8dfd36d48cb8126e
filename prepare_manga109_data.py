"""Manga109s release -> text-line crops + train/val/test JSONL (book-level split by default).

    python prepare_manga109_data.py --manga109_root ./Manga109s --output_dir ./data/manga109s

Each page image is opened once and all its crops are cut from it, in a process pool over pages. Crops and
the JSONL/manifest are written atomically (temp file + rename), so a killed run can simply be rerun: finished
crops are reused and the result is identical to an uninterrupted run.

The code: paddleocr_vl_manga.data.manga109 (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.data.manga109 import main

if __name__ == "__main__":
    sys.exit(main())
