"""manga_ocr_compat: manga-ocr's output convention (checked against the real package) and its interface."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import paddleocr_vl_manga.infer.manga_ocr as manga_ocr_compat
from paddleocr_vl_manga.data.dataset import read_jsonl
from paddleocr_vl_manga.evaluate.metrics import normalize
from paddleocr_vl_manga.infer.manga_ocr import MangaOcr, post_process
from paddleocr_vl_manga.model.generation import generate_texts

REPO = Path(__file__).resolve().parents[2]
TRICKY = ["", " ", "ab 12", "…", "……", "・", "・・", "・・・", ".", "..", "。。", "．．", "！？!?", "ﾃｽﾄ ｶﾞ",
          "Ｔｅｓｔ　１２３", "彼は…そう・・・思った.", "a\nb\tc\u3000d", "~^_`{|}", "‥", "x・.・y", "１.5"]


def test_post_process_is_manga_ocrs() -> None:
    # The installed manga-ocr package (installed by `make setup` without its model and heavy deps); only its
    # post-processing is imported, no model is loaded.
    real = pytest.importorskip("manga_ocr.ocr", reason="manga-ocr not installed (make setup installs it)")
    alphabet = "aZ09 .・…!?ｱｶﾞｰ　\nア漢字ー．・。、「」~"
    rng = random.Random(0)
    texts = TRICKY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    for text in texts:
        assert post_process(text) == real.post_process(text), repr(text)
    assert normalize("彼は…そう・・・思った. 12", "mangaocr") == "彼は．．．そう．．．思った．１２"  # by hand


def test_normalization_and_post_process_are_one_implementation() -> None:
    assert all(normalize(t, "mangaocr") == post_process(t) for t in TRICKY)
    assert manga_ocr_compat.post_process.__module__ == "paddleocr_vl_manga.evaluate.metrics"


@pytest.fixture(scope="module")
def crops(data_dir: Path) -> list[str]:
    return [r["image_path"] for r in read_jsonl(data_dir / "test.jsonl")[:5]]


def test_manga_ocr_interface(tiny_model: Path, crops: list[str]) -> None:
    mocr = MangaOcr(tiny_model, force_cpu=True, max_new_tokens=8)
    raw = MangaOcr.from_model(mocr.model, mocr.processor, raw=True, max_new_tokens=8)
    images = [Image.open(p) for p in crops]
    expected_raw = generate_texts(mocr.model, mocr.processor, [im.convert("RGB") for im in images],
                                  batch_size=1, max_new_tokens=8)
    assert [raw(p) for p in crops] == expected_raw  # raw=True: the model's text untouched
    texts = [mocr(p) for p in crops]
    assert texts == [post_process(t) for t in expected_raw]  # default: manga-ocr's convention
    assert [mocr(Path(p)) for p in crops[:2]] == [mocr(im) for im in images[:2]] == texts[:2]
    assert mocr.batch(crops) == texts == mocr.batch(images[::-1], batch_size=2)[::-1]
    with pytest.raises(ValueError, match="must be a path or PIL.Image"):
        mocr(b"not an image")
    with pytest.raises(ValueError, match="must be positive"):
        MangaOcr.from_model(mocr.model, mocr.processor, batch_size=0)


def test_manga_ocr_default_id_means_our_model(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tools pass manga-ocr's own default id when the user changed nothing; it maps to $MANGA_OCR_COMPAT_MODEL.
    monkeypatch.setenv("MANGA_OCR_COMPAT_MODEL", str(tiny_model))
    mocr = MangaOcr("kha-white/manga-ocr-base", force_cpu=True)
    assert mocr.model.config.text_config.hidden_size == 64  # the tiny model, not a download
    assert str(next(mocr.model.parameters()).device) == "cpu"


def test_shim_package_on_pythonpath(tiny_model: Path, crops: list[str], tmp_path: Path) -> None:
    """What a tool does: `from manga_ocr import MangaOcr` with only compat/ on PYTHONPATH, run elsewhere."""
    code = ("import sys, manga_ocr; from manga_ocr import MangaOcr\n"
            "m = MangaOcr(sys.argv[1], force_cpu=True, max_new_tokens=8)\n"
            "print(manga_ocr.__file__); print(repr(m(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "compat"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model), crops[0]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    where, text = proc.stdout.strip().splitlines()[-2:]
    assert Path(where) == REPO / "compat" / "manga_ocr" / "__init__.py"
    assert text == repr(MangaOcr(tiny_model, force_cpu=True, max_new_tokens=8)(crops[0]))


@pytest.mark.parametrize("args", [(), ("kha-white/manga-ocr-base",)], ids=["no_argument", "manga_ocr_id"])
def test_manga_ocr_default_follows_the_environment(args: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    # `MangaOcr()` is manga-ocr's usual call: it must load $MANGA_OCR_COMPAT_MODEL, never the hub's base.
    # MangaOcr imports load_for_inference from here when called
    import paddleocr_vl_manga.model.loading as ocr_model

    asked: list[str] = []

    def load(path: str, **kwargs: object) -> tuple[None, None, None]:
        asked.append(path)
        return None, None, None

    monkeypatch.setattr(ocr_model, "load_for_inference", load)
    monkeypatch.setenv("MANGA_OCR_COMPAT_MODEL", "/models/fine-tuned")
    MangaOcr(*args)
    monkeypatch.delenv("MANGA_OCR_COMPAT_MODEL")
    MangaOcr(*args)
    assert asked == ["/models/fine-tuned", manga_ocr_compat.DEFAULT_MODEL]


def test_read_gives_text_confidence_and_stop(tiny_model: Path) -> None:
    """MangaOcr.read: the same text as __call__, with the model's confidence and why it stopped (issue 29)."""
    crop = Image.new("RGB", (40, 120), "white")
    mocr = MangaOcr(tiny_model, force_cpu=True, max_new_tokens=8, min_pixels=50_176, max_pixels=50_176)
    reading = mocr.read(crop)
    assert reading.text == mocr(crop) and reading.stop in ("eos", "cap", "loop")
    assert 0.0 <= reading.min_probability <= reading.confidence <= 1.0
    assert mocr.pixel_budget == (50_176, 50_176) and mocr.device == "cpu"
    assert [r.text for r in mocr.read_many([crop, crop])] == mocr.batch([crop, crop])
    with pytest.raises(ValueError, match="min_pixels 9000 is above max_pixels 100"):
        MangaOcr(tiny_model, force_cpu=True, min_pixels=9000, max_pixels=100)
