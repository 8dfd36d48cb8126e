"""A persistent local OCR server over a PaddleOCR-VL checkpoint: load the model once, OCR from any tool.

    python serve.py --model_path ./runs/ft                       # http://127.0.0.1:8000, this machine only
    python serve.py --model_path ./runs/ft --quantize int8 --port 8765
    PADDLEOCR_VL_MANGA_API_KEY=secret python serve.py --model_path ./runs/ft --host 0.0.0.0

Endpoints (docs/serving.md): GET /health; POST /ocr (multipart: `image` crop files, or a `page` file and
`boxes` JSON [[x0,y0,x1,y1], ...]) -> {"results": [{"text", "confidence", "min_probability", "stop"}]};
POST /v1/chat/completions (OpenAI-compatible, images as data URIs); GET /v1/models; GET / (a page).

It binds 127.0.0.1 unless --host says otherwise; any other address needs --api_key (or the environment
variable PADDLEOCR_VL_MANGA_API_KEY), which every request but GET /health and the page must then send as
`Authorization: Bearer KEY`. Ctrl-C or SIGTERM: in-flight requests are answered, then it exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

API_KEY_ENV = "PADDLEOCR_VL_MANGA_API_KEY"


class ServeError(Exception):
    """Bad arguments; printed as one `error: ...` line, exit 2."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as reachable
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use costs no model load, and --port 0
    picks a free port (printed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()  # now: a bound socket that is not listening lets a second server bind the port too
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server there? "
                         "try another --port") from None
    return sock


def _server_class():  # noqa: ANN202
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a caught Ctrl-C / SIGTERM ends in `return` (exit 0) after the graceful
        shutdown: uvicorn >= 0.29 raises the signal again once it is done, which kills the process with
        SIGTERM's status (-15) or a KeyboardInterrupt traceback."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def missing_packages() -> list[str]:
    """The server's packages (requirements.txt) this Python lacks: a kit updated by `git pull` without
    `pip install -r requirements.txt` would otherwise die in an import traceback or, without python-multipart,
    start and answer every POST /ocr with a 500."""
    from importlib.util import find_spec

    wanted = {"fastapi": ["fastapi"], "uvicorn": ["uvicorn"],
              "python-multipart": ["python_multipart", "multipart"]}  # "multipart" before 0.0.13
    return [name for name, modules in wanted.items() if not any(find_spec(m) for m in modules)]


def main(argv: list[str] | None = None) -> int:
    missing = missing_packages()
    if missing:
        print(f"error: serve.py needs {', '.join(missing)}: pip install -r requirements.txt", file=sys.stderr)
        return 2
    from paddleocr_vl_manga.model.quantize import METHODS as QUANTIZE_METHODS
    from paddleocr_vl_manga.serve.app import Limits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True, help="hub id or local folder of the model")
    ap.add_argument("--quantize", choices=QUANTIZE_METHODS,
                    help="int8 linear layers on the CPU (model/quantize.py: int8 everywhere, int8-text the "
                    "language model only); default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--min_pixels", type=int, help="override the image processor's min_pixels (at most "
                    "max_pixels)")
    ap.add_argument("--max_pixels", type=int, help="override the image processor's max_pixels (at least "
                    "min_pixels)")
    ap.add_argument("--force_cpu", action="store_true", help="run on the CPU even where CUDA or Apple MPS is "
                    "available (default: CUDA, then MPS, then CPU, as MangaOcr)")
    ap.add_argument("--full_vocabulary", action="store_true",
                    help="compute lm_head over the whole vocabulary even where the model folder has an "
                    "output_vocabulary.json (default: only the tokens training's labels used; a character "
                    "no label had cannot be read)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                    "machine only); any other address needs --api_key")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: a free one, "
                    "printed)")
    ap.add_argument("--api_key", default=os.environ.get(API_KEY_ENV) or None,
                    help=f"key every request but GET /health and the page must send as 'Authorization: "
                    f"Bearer KEY' (default: ${API_KEY_ENV}); required off loopback")
    help_of = {
        "max_body_mb": "largest request body, MB (413 over it)",
        "max_image_pixels": "most pixels in one decoded image, crop or page, and in a request's images or "
        "boxes together (413 over it)",
        "max_crops": "most crops in one request: image files, boxes or chat images (413 over it)",
        "request_timeout_s": "longest a request may take, queueing included, seconds (504 over it)",
        "batch_window_ms": "how long the batcher waits for other requests before reading (0: not at all)",
        "max_batch_size": "most crops read in one batch (read_many's batch size)",
    }
    # int8 quantizes activations with one scale per batch, so a crop's text depends on its batch mates (7 of
    # 8 tiny-model crops read otherwise batched), and on a CPU batching gained no throughput at full size
    # (docs/serving.md): quantized, each crop is read alone unless asked, so its text is MangaOcr()'s.
    for f in fields(Limits):
        default, shown = f.default, f"{f.default:g}"
        if f.name == "max_batch_size":
            default = None
            shown = f"{f.default}; 1 with --quantize, whose per-batch scale ties a text to its batch mates"
        ap.add_argument(f"--{f.name}", type=type(f.default), default=default,
                        help=f"{help_of[f.name]} (default {shown})")
    a = ap.parse_args(argv)
    if a.max_batch_size is None:
        a.max_batch_size = 1 if a.quantize else Limits.max_batch_size

    from paddleocr_vl_manga.model.loading import ModelLoadError

    try:
        try:
            limits = Limits(**{f.name: getattr(a, f.name) for f in fields(Limits)})
        except ValueError as e:
            raise ServeError(str(e)) from None
        if not is_loopback(a.host) and not a.api_key:
            raise ServeError(f"--host {a.host} lets other machines in: give --api_key KEY (or set "
                             f"{API_KEY_ENV}), or keep the default --host 127.0.0.1")
        if not 0 <= a.port <= 65535:
            raise ServeError(f"--port must be 0..65535, got {a.port}")
        sock = bind(a.host, a.port)
        return run(a, limits, sock)
    except (ServeError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while the model loads
        print("interrupted", file=sys.stderr)
        return 130


def run(a: argparse.Namespace, limits: Any, sock: socket.socket) -> int:
    import uvicorn

    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr
    from paddleocr_vl_manga.serve.app import create_app

    with sock:
        try:
            ocr = MangaOcr(a.model_path, force_cpu=a.force_cpu, quantize=a.quantize, min_pixels=a.min_pixels,
                           max_pixels=a.max_pixels, batch_size=limits.max_batch_size,
                           full_vocabulary=a.full_vocabulary)
        except ValueError as e:  # bad pixel bounds (ModelLoadError is a ValueError too)
            raise ServeError(str(e)) from None
        app = create_app(ocr, limits, api_key=a.api_key)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving {ocr.model_path} on http://{shown}:{port} ({ocr.device}, pixels "
              f"{ocr.pixel_budget[0]}..{ocr.pixel_budget[1]}{', ' + ocr.quantize if ocr.quantize else ''}"
              f"{', API key required' if a.api_key else ''}); Ctrl-C to stop", file=sys.stderr, flush=True)
        # timeout_graceful_shutdown None: on Ctrl-C / SIGTERM every in-flight request is answered first (each
        # is bounded by --request_timeout_s anyway).
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=None, server_header=False)
        _server_class()(config).run(sockets=[sock])
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
