"""Synthetic manga text lines for training: DIR/crops/, DIR/train.jsonl, DIR/manifest.json (prepare's format).

    python tools/fonts.py --pack manga      # once: ~60 faces in 6 styles (Debian + OFL npm fonts)
    python synthesize_lines.py --out ./data/synth_lines --num_lines 1000000 --manga109_dir ./data/manga109s

Text comes from the *train* split of a prepared Manga109 folder (re-rendered and recombined; val/test
books are never read) plus an offline mixture (wordfreq words, interjections, particles, SFX, digits/Latin,
random JIS kanji). Lines are drawn vertically (one character per cell, columns right to left, the font's
vertical forms) or horizontally, with furigana noise, tate-chu-yoko, outlines, bubbles, page or screentone
backgrounds and photometric/geometric augmentation. The label is exactly what is drawn, in horizontal
code points.

Work is cut into chunks of CHUNK lines, each with its own RNG: output is the same at any --num_workers, a
killed run resumes where it stopped (a chunk's part file is written last, atomically), and --shard K/N runs
the chunks with index = K-1 mod N, so N machines writing into one shared DIR make the unsharded result.

The code: paddleocr_vl_manga.data.synth.run (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.data.synth.run import main

if __name__ == "__main__":
    sys.exit(main())
