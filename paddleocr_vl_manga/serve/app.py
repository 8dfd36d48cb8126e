"""The server's routes: GET /health, POST /ocr, POST /v1/chat/completions, GET /v1/models, GET / (the page).

`create_app(ocr, limits, api_key)` wraps any object with MangaOcr's `read_many`, `model_path`, `device`,
`quantize` and `pixel_budget`; cli.py gives it a loaded MangaOcr. Every crop goes through one Batcher
(batching.py), so the texts are exactly what `MangaOcr.read_many` gives for the same decoded images.

Every error is JSON in OpenAI's shape, `{"error": {"message": ..., "type": ...}}`, with a 4xx status that
names the problem (docs/serving.md lists them); nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from paddleocr_vl_manga.serve.batching import Batcher

STATIC = Path(__file__).resolve().parent / "static"
# Paths anyone may GET without the key: /health for supervisors, the page and its assets because a browser
# cannot add an Authorization header to a navigation (the page asks for the key and sends it on each
# request it makes); they hold no data and run no model.
OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each limit is checked before the model sees anything."""

    max_body_mb: float = 20.0  # a 2-page spread as PNG at 300 dpi is ~10 MB
    max_image_pixels: int = 40_000_000  # per decoded image (crop or page): a 2-page spread at 600 dpi
    max_crops: int = 64  # a dense manga page has ~10-40 text boxes
    request_timeout_s: float = 300.0  # 64 crops of the 0.9B model on 2 CPU cores take minutes
    batch_window_ms: float = 10.0
    max_batch_size: int = 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (value > 0 or (name == "batch_window_ms" and value == 0)) or math.isinf(value):
                raise ValueError(f"--{name} must be positive, got {value}")


class ApiError(Exception):
    """A client's mistake: answered as {"error": {"message", "type"}} with this HTTP status."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


class Guard:
    """ASGI middleware: the API key (Authorization: Bearer KEY) and the body size, before any route runs.

    The body is counted as it arrives, so a client that sends no Content-Length (chunked) is cut off too."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, stats: dict,
                 drain_timeout_s: float) -> None:
        self.app, self.api_key, self.max_body_bytes, self.stats = app, api_key, max_body_bytes, stats
        self.drain_timeout_s = drain_timeout_s

    async def _drain(self, receive: Callable, received: int) -> None:
        """Read the rest of an oversized body (up to 4x the limit, at least 64 MB) before answering 413:
        a client still sending when the server answers and closes gets a connection reset, not the 413.
        At most drain_timeout_s: a client that stalls mid-body must not hold the connection, nor Ctrl-C's
        graceful shutdown, forever."""
        cap = max(4 * self.max_body_bytes, 64 * 1024 * 1024)

        async def read_rest() -> None:
            nonlocal received
            while received <= cap:
                message = await receive()
                received += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    return

        try:
            await asyncio.wait_for(read_rest(), self.drain_timeout_s)
        except asyncio.TimeoutError:
            pass  # answer now; the server closes the half-read connection after the error

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        open_path = path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
        if self.api_key and not open_path:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                      self.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                response = error_response(401, "authentication_error",
                                          f"{what}: send the server's key as 'Authorization: Bearer KEY'",
                                          headers={"WWW-Authenticate": "Bearer"})
                await self._drain(receive, 0)  # a client sending an image gets the 401, not a reset
                return await response(scope, receive, send)
        too_large = ApiError(413, "request_too_large",
                             f"the request body is over the server's limit of {self.max_body_bytes} bytes "
                             "(--max_body_mb)")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._drain(receive, 0)
            response = error_response(too_large.status, too_large.kind, too_large.message,
                                      headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                if message.get("more_body"):
                    await self._drain(receive, received)
                raise too_large
            return message

        counted = not open_path
        self.stats["requests_in_flight"] += counted
        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.stats["requests_in_flight"] -= counted


# ---------------------------------------------------------------- input


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """The file's bytes as the RGB image MangaOcr reads (data.dataset.rgb_image), its size checked from the
    header before the pixels are decoded."""
    from paddleocr_vl_manga.data.dataset import rgb_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ApiError(413, "image_too_large", f"{what} is {width}x{height} = {width * height} "
                                   f"pixels, over the server's limit of {max_pixels} (--max_image_pixels)")
                im.load()
                return rgb_image(im)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large", f"{what}: {e}") from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError, ... on corrupt files
        reason = ("not a format PIL knows" if isinstance(e, Image.UnidentifiedImageError)
                  else f"{type(e).__name__}: {e}")
        raise ApiError(400, "invalid_image",
                       f"{what} is not an image the server can read ({reason})") from None


def header_pixels(data: bytes) -> int:
    """An image file's width x height from its header alone; 0 when PIL cannot read it (decode_image then
    names the problem)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0] * im.size[1]
    except Exception:  # noqa: BLE001  (decode_image reports it, with its reason)
        return 0


def check_total_pixels(sizes: list[int], what: str, limits: Limits) -> None:
    """--max_image_pixels also bounds a request's images (or boxes) together, before any is decoded: each
    image under it, 64 of them (PNG bombs of a few kB each) decoded to tens of GB. One image alone is
    decode_image's check, which names the file."""
    if len(sizes) > 1 and sum(sizes) > limits.max_image_pixels:
        raise ApiError(413, "image_too_large", f"the {len(sizes)} {what} total {sum(sizes)} pixels, over the "
                       f"server's limit of {limits.max_image_pixels} per request (--max_image_pixels)")


def parse_boxes(text: str, width: int, height: int, max_crops: int) -> list[tuple[int, int, int, int]]:
    """`boxes` as predict.py --boxes reads them: [[x0, y0, x1, y1], ...] in page pixels (objects with a
    "bbox" key too), each clipped to the page; a box that is empty or wholly outside the page is an error."""
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: brackets nested thousands deep
        raise ApiError(400, "invalid_json", f"boxes is not JSON ({e})") from None
    if not isinstance(items, list) or not items:
        raise ApiError(422, "invalid_boxes", "boxes must be a non-empty JSON list of [x0, y0, x1, y1]")
    if len(items) > max_crops:
        raise ApiError(413, "too_many_crops", f"{len(items)} boxes, over the server's limit of {max_crops} "
                       "crops per request (--max_crops)")
    boxes = []
    for i, item in enumerate(items):
        box = item.get("bbox") if isinstance(item, dict) else item
        numbers = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, int | float) and not isinstance(v, bool)
            and (isinstance(v, int) or math.isfinite(v))  # math.isfinite(10**400) raises OverflowError
            for v in box)
        if not numbers:
            raise ApiError(422, "invalid_boxes", f"boxes[{i}] must be [x0, y0, x1, y1] (numbers), got "
                           f"{item!r}")
        x0, y0, x1, y1 = (round(v) for v in box)
        clipped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
        if x0 >= x1 or y0 >= y1 or clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
            raise ApiError(422, "invalid_boxes", f"boxes[{i}] = {box} is empty or outside the "
                           f"{width}x{height} page")
        boxes.append(clipped)
    return boxes


def reading_json(reading: Any) -> dict:
    def number(x: float) -> float | None:  # NaN is no JSON
        return None if x is None or math.isnan(x) else float(x)

    return {"text": reading.text, "confidence": number(reading.confidence),
            "min_probability": number(reading.min_probability), "stop": reading.stop}


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _ocr_inputs(request: Request, limits: Limits) -> list[Image.Image]:
    """POST /ocr's form: `image` files (crops), or one `page` file and `boxes`; the crops, decoded."""
    if _content_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "POST /ocr takes multipart/form-data (image files, or "
                       f"a page file and boxes), got {_content_type(request) or 'no content type'!r}")
    try:
        form = await request.form(max_files=limits.max_crops + 1, max_fields=8)
    except StarletteHTTPException as e:  # python-multipart's complaints
        if "Too many files" in str(e.detail):
            raise ApiError(413, "too_many_crops", f"over the server's limit of {limits.max_crops} crops per "
                           "request (--max_crops)") from None
        raise ApiError(400, "invalid_form", f"the multipart body cannot be read: {e.detail}") from None
    unknown = sorted(set(form.keys()) - {"image", "page", "boxes"})
    if unknown:
        raise ApiError(400, "invalid_form", f"unknown form field {unknown[0]!r}: send `image` files (crops), "
                       "or one `page` file and `boxes`")
    crops, pages, boxes = form.getlist("image"), form.getlist("page"), form.getlist("boxes")
    for name, values in (("image", crops), ("page", pages)):
        if any(not isinstance(v, UploadFile) for v in values):
            raise ApiError(400, "invalid_form", f"`{name}` must be a file part (with a filename), not a text "
                           "field")
    if crops and (pages or boxes):
        raise ApiError(400, "invalid_form", "send either `image` files or a `page` with `boxes`, not both")
    if crops:
        if len(crops) > limits.max_crops:
            raise ApiError(413, "too_many_crops", f"{len(crops)} images, over the server's limit of "
                           f"{limits.max_crops} crops per request (--max_crops)")
        data = [await f.read() for f in crops]
        names = [f"image {i} ({f.filename})" for i, f in enumerate(crops)]
        check_total_pixels(list(map(header_pixels, data)), "images", limits)
        return await asyncio.to_thread(  # decoding a big image takes ~0.1 s: off the event loop
            lambda: [decode_image(d, n, limits.max_image_pixels) for d, n in zip(data, names, strict=True)])
    if len(boxes) == 1 and isinstance(boxes[0], UploadFile):  # curl -F boxes=@boxes.json: a file part
        try:
            boxes = [(await boxes[0].read()).decode("utf-8-sig")]
        except UnicodeDecodeError as e:
            raise ApiError(400, "invalid_json", f"boxes is not UTF-8 JSON ({e})") from None
    if len(pages) != 1 or len(boxes) != 1 or not isinstance(boxes[0], str):
        raise ApiError(400, "invalid_form", "send one or more `image` files, or exactly one `page` file and "
                       f"one `boxes` field (got {len(pages)} page and {len(boxes)} boxes)")
    page_data = await pages[0].read()
    page = await asyncio.to_thread(decode_image, page_data, f"page ({pages[0].filename})",
                                   limits.max_image_pixels)
    clipped = parse_boxes(boxes[0], *page.size, limits.max_crops)
    # each crop is a copy of its box's pixels
    check_total_pixels([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in clipped], "boxes", limits)
    return [page.crop(b) for b in clipped]


def _data_uri_bytes(url: Any, i: int) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, "invalid_request_error", f"image {i}: only data: URIs are read "
                       "(data:image/png;base64,...); the server fetches no URL")
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, "invalid_request_error", f"image {i}: expected a base64 data URI "
                       "(data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_request_error",
                       f"image {i}: the data URI is not valid base64 ({e})") from None
    return data


def chat_images(body: Any, limits: Limits) -> list[Image.Image]:
    """The images of the last user message (the OCR prompt beside them is not needed: the model always gets
    its own); each must be a base64 data URI."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ApiError(400, "invalid_request_error", "the body must be a JSON object with a messages list")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "invalid_request_error", "no user message: put the image in a user message")
    content = users[-1].get("content")
    parts = content if isinstance(content, list) else []
    urls = []
    for part in parts:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image_url = part.get("image_url")
            urls.append(image_url.get("url") if isinstance(image_url, dict) else image_url)
    if not urls:
        raise ApiError(400, "invalid_request_error", "the last user message has no image: add a content part "
                       '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')
    if len(urls) > limits.max_crops:
        raise ApiError(413, "too_many_crops", f"{len(urls)} images, over the server's limit of "
                       f"{limits.max_crops} crops per request (--max_crops)")
    data = [_data_uri_bytes(url, i) for i, url in enumerate(urls)]
    check_total_pixels(list(map(header_pixels, data)), "images", limits)
    return [decode_image(d, f"image {i}", limits.max_image_pixels) for i, d in enumerate(data)]


# ---------------------------------------------------------------- the app


def create_app(ocr: Any, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The ASGI app over a loaded MangaOcr (or anything with its read_many and attributes)."""
    limits = limits or Limits()
    batcher = Batcher(ocr.read_many, window_s=limits.batch_window_ms / 1000,
                      max_batch_size=limits.max_batch_size)
    model_id = Path(str(ocr.model_path)).name or str(ocr.model_path)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        await batcher.start()
        yield
        await batcher.stop()  # uvicorn has answered every in-flight request by now

    app = FastAPI(title="paddleocr-vl-manga OCR server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher, app.state.limits = batcher, limits
    stats = {"requests_in_flight": 0}  # API requests inside the app now (Guard counts them)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=int(limits.max_body_mb * 1024 * 1024),
                       stats=stats, drain_timeout_s=limits.request_timeout_s)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.kind, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return error_response(e.status_code, kind, f"{request.method} {request.url.path}: {e.detail}",
                              headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request_error", str(e.errors()))

    async def timed(work: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await asyncio.wait_for(work(), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the request took over the server's limit of "
                           f"{limits.request_timeout_s:g} s (--request_timeout_s); send fewer crops per "
                           "request") from None

    @app.get("/health")
    async def health() -> dict:
        min_pixels, max_pixels = ocr.pixel_budget
        return {"status": "ok", "model": str(ocr.model_path), "min_pixels": min_pixels,
                "max_pixels": max_pixels, "quantize": ocr.quantize, "device": str(ocr.device),
                "api_key_required": bool(api_key), "batches_run": batcher.batches_run, **stats,
                "limits": asdict(limits)}

    @app.post("/ocr")
    async def ocr_route(request: Request) -> dict:
        async def work() -> dict:
            crops = await _ocr_inputs(request, limits)
            return {"results": [reading_json(r) for r in await batcher.read(crops)]}

        return await timed(work)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "paddleocr-vl-manga"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if _content_type(request) != "application/json":
            raise ApiError(415, "unsupported_media_type", "POST /v1/chat/completions takes application/json, "
                           f"got {_content_type(request) or 'no content type'!r}")

        async def work() -> tuple[dict, list]:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:  # RecursionError: brackets nested thousands deep
                raise ApiError(400, "invalid_json", f"the body is not JSON ({e})") from None
            images = await asyncio.to_thread(chat_images, body, limits)
            return body, await batcher.read(images)

        body, readings = await timed(work)
        text = "\n".join(r.text for r in readings)  # several images: their texts, one per line, in order
        model = body.get("model") or model_id
        finish = "stop" if all(r.stop == "eos" for r in readings) else "length"
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(_stream(completion_id, created, model, text, finish),
                                     media_type="text/event-stream")
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                # beyond OpenAI's fields: each image's reading (confidence, stop), for clients that want it
                "ocr_results": [reading_json(r) for r in readings]}

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _stream(completion_id: str, created: int, model: str, text: str, finish: str):  # noqa: ANN202
    """stream=true: the whole text in one chunk, then the finish chunk and [DONE] (OpenAI's SSE shape)."""
    def chunk(delta: dict, finish_reason: str | None) -> str:
        event = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return "data: " + json.dumps(event, ensure_ascii=False) + "\n\n"

    yield chunk({"role": "assistant", "content": text}, None)
    yield chunk({}, finish)
    yield "data: [DONE]\n\n"
