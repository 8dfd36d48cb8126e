"""What serve.py's batching buys: throughput and p50/p99 latency at 1, 4 and 16 concurrent clients, CPU.

    python benchmarks/bench_serve.py --model tiny                    # seconds: the tests' tiny model
    python benchmarks/bench_serve.py --model full --requests 32      # the full-size (0.9B) random model

Rows, all in one process on the same crops (seeded noise on paper, sizes of manga text lines), one crop per
request as owocr and ImageTrans send them:
  one at a time   MangaOcr.read(crop) in a loop, no server: the baseline, what a tool loading the model itself
                  gets
  server cN       N clients each sending POST /ocr in a loop until the requests are spent, batching on (a
                  10 ms window, --max_batch_size 16)
  unbatched cN    the same with --max_batch_size 1: requests still queue for the one model thread, one crop
                  per read_many
  ... again       the first row once more at the end: how far the machine's load moved the figures
Latency is per request, as the client sees it (queueing included); throughput is requests / wall time of the
row. The server runs in this process (uvicorn in a thread, the model in its own thread) and the clients are
httpx.AsyncClient tasks on another thread: on a 2-core machine they take a little CPU from the model, as a
tool on the same machine does. Each row prints the 1-minute load average (os.getloadavg) before and after it:
other work on a shared machine slows every row, so compare rows of one run, not runs.

The full-size model has random weights (benchmarks/bench_eval.full_size_random; nothing is downloaded), so
its answers stop at --max_new_tokens or wherever greedy decoding meets the end token, the same crops giving
the same tokens in every row (batched generation gives batch-1 texts: tests/evaluate/test_evaluate.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paddleocr_vl_manga.infer.manga_ocr import MangaOcr  # noqa: E402
from paddleocr_vl_manga.serve.app import Limits, create_app  # noqa: E402

SIZES = [(40, 180), (36, 120), (44, 260), (160, 40), (32, 90), (48, 210), (40, 150), (120, 36)]


def crops(n: int) -> list[bytes]:
    """n PNG crops (w x h of vertical and horizontal manga lines), seeded noise on white."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.where(rng.random((h, w, 1)) < 0.15, rng.integers(0, 120, (h, w, 3)), 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


def load() -> float:
    return os.getloadavg()[0]


class Served:
    """create_app(ocr, limits) under uvicorn in a thread, on a free loopback port."""

    def __init__(self, ocr: MangaOcr, limits: Limits) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(ocr, limits), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


async def drive(url: str, images: list[bytes], concurrency: int) -> list[float]:
    """Latencies of POST /ocr over every image (one per request), `concurrency` clients at once."""
    import httpx

    pending = list(enumerate(images))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            i, data = pending.pop(0)
            t = time.perf_counter()
            r = await http.post(f"{url}/ocr", files=[("image", (f"{i}.png", data, "image/png"))])
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies


def row(name: str, latencies: list[float], wall: float, load_before: float) -> None:
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    print(f"| {name} | {len(latencies)} | {len(latencies) / wall:.2f} | {q[49]:.3f} | {q[98]:.3f} | "
          f"{load_before:.2f} -> {load():.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--requests", type=int, default=64, help="requests (one crop each) per row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max_new_tokens", type=int, default=16, help="token cap of every answer (the full "
                    "model's random weights seldom stop by themselves)")
    ap.add_argument("--min_pixels", type=int, help="the image processor's min_pixels (default: the model's)")
    ap.add_argument("--unbatched", action=argparse.BooleanOptionalAction, default=True,
                    help="also the rows with --max_batch_size 1")
    a = ap.parse_args(argv)

    import torch

    if a.model == "tiny":
        from tools.make_synthetic_manga109 import CHARSET
        from tools.make_tiny_model import build_tiny_model

        folder = tempfile.mkdtemp(prefix="bench_serve_")
        build_tiny_model(folder, charset=CHARSET)
        ocr = MangaOcr(folder, force_cpu=True, max_new_tokens=a.max_new_tokens, min_pixels=a.min_pixels)
    else:
        from benchmarks.bench_eval import full_size_random

        model, processor = full_size_random("cpu", torch.float32)
        ocr = MangaOcr.from_model(model, processor, max_new_tokens=a.max_new_tokens, min_pixels=a.min_pixels)
    images = crops(a.requests)
    print(f"model: {a.model} ({sum(p.numel() for p in ocr.model.parameters()) / 1e6:.1f}M parameters, "
          f"pixels {ocr.pixel_budget[0]}..{ocr.pixel_budget[1]}, max_new_tokens {a.max_new_tokens}); "
          f"{a.requests} requests of one crop per row")
    print(f"machine: {machine()}")
    print("\n| row | requests | requests/s | p50 s | p99 s | load (1 min) |\n|---|---:|---:|---:|---:|---|")

    decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in images]
    ocr.read(decoded[0])  # warm-up: first-call allocations fall on no row

    def one_at_a_time(name: str) -> None:
        before, latencies, t0 = load(), [], time.perf_counter()
        for im in decoded:
            t = time.perf_counter()
            ocr.read(im)
            latencies.append(time.perf_counter() - t)
        row(name, latencies, time.perf_counter() - t0, before)

    one_at_a_time("one at a time (MangaOcr.read, no server)")

    settings = [("server", 16)] + ([("unbatched", 1)] if a.unbatched else [])
    for name, batch in settings:
        served = Served(ocr, Limits(max_batch_size=batch, request_timeout_s=3600))
        try:
            asyncio.run(drive(served.url, images[:2], 1))  # warm-up
            for c in a.concurrency:
                if name == "unbatched" and c == 1:
                    continue  # the same as the batched server at 1 client
                before, t0 = load(), time.perf_counter()
                latencies = asyncio.run(drive(served.url, images, c))
                row(f"{name} c{c}", latencies, time.perf_counter() - t0, before)
        finally:
            served.close()
    one_at_a_time("one at a time, again (the load's drift over the run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
