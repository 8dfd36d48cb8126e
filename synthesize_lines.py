"""Synthetic manga text lines for training: DIR/crops/, DIR/train.jsonl, DIR/manifest.json (prepare's format).

    python tools/fonts.py --pack manga      # once: ~60 faces in 6 styles (Debian + OFL npm fonts)
    python synthesize_lines.py --out ./data/synth_lines --num_lines 1000000 --manga109_dir ./data/manga109s

What it does and why, and every flag: `python synthesize_lines.py --help` (the module's docstring).
The code: paddleocr_vl_manga.data.synth.run (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.data.synth.run import main

if __name__ == "__main__":
    sys.exit(main())
