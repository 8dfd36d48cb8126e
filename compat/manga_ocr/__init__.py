"""A `manga_ocr` package that is this repo's PaddleOCR-VL: `PYTHONPATH=<repo>/compat <a manga-ocr tool>`.

Tools that do `from manga_ocr import MangaOcr` then get paddleocr_vl_manga.infer.manga_ocr.MangaOcr,
with the model from `pretrained_model_name_or_path`, or $MANGA_OCR_COMPAT_MODEL when the tool passes
manga-ocr's default id.
"""

import sys
from pathlib import Path

# The repo root holds the paddleocr_vl_manga package; only this folder needs to be on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paddleocr_vl_manga.infer.manga_ocr import MangaOcr, post_process  # noqa: E402

__version__ = "0.1.16+paddleocr-vl"  # the manga-ocr release whose interface and output this follows
__all__ = ["MangaOcr", "post_process"]
