"""A real manga-ocr client on the shim: owocr's own Manga OCR engine reads a crop with our model.

`make setup` installs owocr (pinned, --no-deps: its screen-capture, clipboard and tray deps are not needed).
Its engine module, owocr/ocr.py, imports numpy, Pillow, loguru and curl_cffi at the top, and `manga_ocr`
only inside the Manga OCR engine; run.py (the CLI) and config.py (parses argv) are not imported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paddleocr_vl_manga.data.dataset import read_jsonl
from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

REPO = Path(__file__).resolve().parents[2]
# Only the package is imported here (its __init__ is a version number); the client below imports its engines.
pytest.importorskip("owocr", reason="owocr not installed (make setup installs owocr==1.26.8 --no-deps; owocr "
                                    "needs Python >= 3.11)")

# Runs in a fresh process, as the tool would: `from manga_ocr import MangaOcr` inside owocr must find the shim
# through PYTHONPATH (the venv also holds the real manga-ocr package, for test_compat's post_process check).
CLIENT = r'''
import io, json, sys, types
from pathlib import Path


class Unused(types.ModuleType):
    def __getattr__(self, name):  # AttributeError, so that getattr(mod, "__file__", None) probes still work
        raise AttributeError(f"curl_cffi.{name}: stubbed by the test; the Manga OCR engine never uses it")


# owocr/ocr.py imports curl_cffi (an HTTP client bundling its own libcurl, 14 MB) at the top for its web
# engines (Google Lens, Bing, OCR.space, ...); the Manga OCR engine never touches it, and any use would fail.
sys.modules["curl_cffi"] = Unused("curl_cffi")

from PIL import Image
import manga_ocr, owocr, owocr.ocr as ocr

# What owocr's run.py does for `-e mangaocr`: the engine class with the [mangaocr] section of its config. No
# pretrained_model_name_or_path there means manga-ocr's default id, which the shim maps to the env var.
engine = ocr.MangaOcr(config={"force_cpu": True})
crop = Path(sys.argv[1])
png = io.BytesIO()
Image.open(crop).save(png, format="PNG")
results = [engine(Image.open(crop)), engine(png.getvalue()), engine(crop)]  # owocr's three input kinds
print(json.dumps({"version": owocr.__version_string__, "available": engine.available,
                  "shim": manga_ocr.__file__, "model": type(ocr.manga_ocr_model).__module__,
                  "hidden_size": ocr.manga_ocr_model.model.config.text_config.hidden_size,
                  "results": results}))
'''


def test_owocr_manga_ocr_engine_runs_our_model(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    crop = read_jsonl(data_dir / "test.jsonl")[0]["image_path"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "compat"), "MANGA_OCR_COMPAT_MODEL": str(tiny_model),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CLIENT, crop], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["available"], proc.stderr  # owocr found `manga_ocr` and built the model, else it only warns
    assert Path(out["shim"]) == REPO / "compat" / "manga_ocr" / "__init__.py"
    # the tiny model via the env var
    assert (out["model"], out["hidden_size"]) == ("paddleocr_vl_manga.infer.manga_ocr", 64)
    # owocr returns (success, [text]) for its Manga OCR engine; the text is ours, called directly. One
    # thread here as in the client: the same summation order, so the random model's 128 greedy tokens (owocr
    # passes no max_new_tokens) cannot part on a rounding tie.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = MangaOcr(tiny_model, force_cpu=True)(crop)
    finally:
        torch.set_num_threads(threads)
    assert out["results"] == [[True, [expected]]] * 3, out["version"]
