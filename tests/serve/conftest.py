"""Fixtures of the server's tests: the tiny model read by MangaOcr, crop and page files, and real server
processes on loopback (a free port each, output to a file: a full pipe would stall the server)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mocr(tiny_model: Path):  # noqa: ANN201
    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

    return MangaOcr(tiny_model, force_cpu=True)


@pytest.fixture(scope="session")
def crop_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six crops of different sizes and content (seeded noise on paper), as PNG files."""
    out = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(29)
    paths = []
    for i, (w, h) in enumerate([(24, 80), (40, 120), (96, 32), (30, 30), (64, 200), (120, 40)]):
        pixels = np.where(rng.random((h, w, 1)) < 0.2, rng.integers(0, 255, (h, w, 3)), 255).astype(np.uint8)
        paths.append(out / f"crop{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="session")
def page_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    pixels = np.where(rng.random((300, 200, 1)) < 0.1, rng.integers(0, 255, (300, 200, 3)), 255)
    path = tmp_path_factory.mktemp("page") / "page.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return path


class ServerProcess:
    """`python serve.py ... --port 0` in a subprocess; `url` once /health answers."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict | None = None) -> None:
        self.log = log
        environment = {k: v for k, v in os.environ.items() if k != "PADDLEOCR_VL_MANGA_API_KEY"}
        environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model_path", str(model),
                                          "--port", "0", *args], cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, env=environment)
        self.url = self._wait_until_healthy()

    def _wait_until_healthy(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.output()}")
            if url is None:
                found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.output())
                url = found.group(1) if found else None
            if url is not None:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def start_server(tiny_model: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        started.append(ServerProcess(tiny_model, tmp_path / f"server{len(started)}.log", *args, env=env))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
