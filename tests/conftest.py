"""Shared fixtures: a small synthetic Manga109-format release, built once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.make_synthetic_manga109 import generate


@pytest.fixture(scope="session")
def synthetic_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only release: 5 books x 3 small pages. Copy it (see `release_copy`) before corrupting anything."""
    root = tmp_path_factory.mktemp("m109") / "Manga109s"
    generate(root, books=5, pages=3, seed=7, width=800, height=560, num_workers=1)
    return root


@pytest.fixture
def release_copy(synthetic_release: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "release"
    shutil.copytree(synthetic_release, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random PaddleOCR-VL (untied lm_head) whose tokenizer covers the synthetic charset."""
    from tools.make_synthetic_manga109 import CHARSET
    from tools.make_tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(out, charset=CHARSET)
    return out


@pytest.fixture(scope="session")
def release_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """release_model("v1" | "v1.5" | "v1.6"): a tiny checkpoint laid out like that real release, built once
    per session (read-only: copy it before changing anything)."""
    from tools.make_tiny_model import build_release_like

    built: dict[str, Path] = {}

    def get(version: str) -> Path:
        if version not in built:
            built[version] = Path(build_release_like(tmp_path_factory.mktemp(f"release_{version}"), version))
        return built[version]

    return get


@pytest.fixture(scope="session")
def prepared(synthetic_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic release prepared with a book-level split (3 train, 1 val, 1 test book)."""
    import paddleocr_vl_manga.data.manga109 as prep

    out = tmp_path_factory.mktemp("prepared")
    prep.run(prep.PrepareArguments(manga109_root=str(synthetic_release), output_dir=str(out), num_workers=1,
                                   test_fraction=0.2, val_fraction=0.2))
    return out



@pytest.fixture(scope="session")
def data_dir(synthetic_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic release prepared with prepare's default split settings (read-only)."""
    import paddleocr_vl_manga.data.manga109 as prep

    out = tmp_path_factory.mktemp("data")
    prep.run(prep.PrepareArguments(manga109_root=str(synthetic_release), output_dir=str(out), num_workers=1))
    return out

@pytest.fixture(scope="session")
def extreme_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only release of 30 books x 1 full-size (1654 x 1170) page made with extremes=True: every book's
    page holds the real data's extremes (a large box, thin 10 x 400 and 400 x 10 boxes, a 12 x 12 box, two
    100+ character texts with Latin letters and digits, an empty box) among ordinary bubbles."""
    root = tmp_path_factory.mktemp("m109x") / "Manga109s"
    generate(root, books=30, pages=1, seed=19, num_workers=1, progress=False, extremes=True)
    return root


@pytest.fixture(scope="session")
def extreme_data(extreme_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`extreme_release` prepared with prepare's default settings (read-only): 30 books are the fewest whose
    default fractions (test 0.1, val 0.05) give 2 val and 3 test books (25 train), so "the first N of val"
    is one book. Every split has a crop of 600+ tokens with the release's v1 processor (about 1100 at most;
    the tiny model's processor caps images at 64 tokens, so about 220 there), a 10 x 400, a 400 x 10 and a
    12 x 12 crop and 100+ character texts; prepare skips the empty boxes. About 7 s to build on 2 cores."""
    import paddleocr_vl_manga.data.manga109 as prep

    out = tmp_path_factory.mktemp("extreme_data")
    prep.run(prep.PrepareArguments(manga109_root=str(extreme_release), output_dir=str(out), num_workers=1))
    return out


@pytest.fixture
def error_line(capsys: pytest.CaptureFixture[str]) -> Callable[[int], str]:
    """Checks a CLI failed cleanly (exit 2, no traceback) and returns its single `error: ` line."""
    def read(rc: int) -> str:
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        return lines[0]
    return read
