"""The server's routes in-process (starlette's TestClient runs the app and its batcher): texts exactly as
MangaOcr reads the same files, every bad request a JSON 4xx naming its problem, the server serving after each,
the API key, and serve.py's flag errors (one line, exit 2)."""

from __future__ import annotations

import base64
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from paddleocr_vl_manga.model.generation import Reading
from paddleocr_vl_manga.serve.app import Limits, create_app
from paddleocr_vl_manga.serve.cli import main


def files(paths: list[Path], field: str = "image") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "image/png")) for p in paths]


def expected(mocr: Any, images: list) -> list[dict]:
    """What a sequential MangaOcr gives, one crop at a time."""
    out = []
    for im in images:
        r = mocr.read(im)
        out.append({"text": r.text, "confidence": pytest.approx(r.confidence, rel=1e-4),
                    "min_probability": pytest.approx(r.min_probability, rel=1e-4), "stop": r.stop})
    return out


def chat_body(*paths: Path, text: str = "OCR:") -> dict:
    parts: list[dict] = [{"type": "text", "text": text}]
    for p in paths:
        uri = "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()
        parts.append({"type": "image_url", "image_url": {"url": uri}})
    return {"model": "anything", "messages": [{"role": "user", "content": parts}]}


@pytest.fixture(scope="module")
def client(mocr: Any):  # noqa: ANN201
    with TestClient(create_app(mocr)) as c:
        yield c


def test_health_reports_model_pixel_budget_quantization_device_and_limits(client: TestClient,
                                                                           mocr: Any) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["model"] == str(mocr.model_path)
    assert (health["min_pixels"], health["max_pixels"]) == mocr.pixel_budget
    assert health["quantize"] is None and health["device"] == "cpu"
    assert health["limits"]["max_crops"] == Limits().max_crops


def test_ocr_crops_come_back_in_input_order_with_manga_ocr_texts(client: TestClient, mocr: Any,
                                                                  crop_files: list[Path]) -> None:
    order = [crop_files[i] for i in (4, 0, 2, 0)]  # sizes mixed (read_many sorts by size), one repeated
    response = client.post("/ocr", files=files(order))
    assert response.status_code == 200, response.text
    assert response.json()["results"] == expected(mocr, order)


def test_ocr_page_and_boxes_read_the_boxes_of_the_page(client: TestClient, mocr: Any,
                                                       page_file: Path) -> None:
    boxes = [[10, 10, 50, 150], [100.4, 20, 190, 60], [150, 250, 260, 320]]  # the last runs off the page
    response = client.post("/ocr", files=files([page_file], "page"), data={"boxes": json.dumps(boxes)})
    assert response.status_code == 200, response.text
    page = Image.open(page_file).convert("RGB")
    crops = [page.crop(b) for b in [(10, 10, 50, 150), (100, 20, 190, 60), (150, 250, 200, 300)]]
    assert response.json()["results"] == expected(mocr, crops)


def test_a_box_with_a_huge_integer_is_clipped_to_the_page_not_a_server_error(client: TestClient, mocr: Any,
                                                                             page_file: Path) -> None:
    # JSON's integers are unbounded: 10**400 once made math.isfinite raise OverflowError, a plain-text 500
    response = client.post("/ocr", files=files([page_file], "page"),
                           data={"boxes": f"[[10, 10, {10 ** 400}, 60]]"})
    assert response.status_code == 200, response.text
    width = Image.open(page_file).width
    crop = Image.open(page_file).convert("RGB").crop((10, 10, width, 60))
    assert response.json()["results"] == expected(mocr, [crop])


def test_boxes_sent_as_a_file_part_are_read_as_the_boxes_field(client: TestClient, mocr: Any,
                                                               page_file: Path) -> None:
    # `curl -F boxes=@boxes.json` (the file predict.py --boxes takes) sends boxes as a file part
    boxes = [[10, 10, 50, 150], [100, 20, 190, 60]]
    boxes_file = ("boxes", ("boxes.json", json.dumps(boxes).encode(), "application/json"))
    response = client.post("/ocr", files=[*files([page_file], "page"), boxes_file])
    assert response.status_code == 200, response.text
    page = Image.open(page_file).convert("RGB")
    assert response.json()["results"] == expected(mocr, [page.crop(tuple(b)) for b in boxes])


def test_chat_completion_answers_the_text_as_the_assistant_message(client: TestClient, mocr: Any,
                                                                   crop_files: list[Path]) -> None:
    answer = client.post("/v1/chat/completions", json=chat_body(crop_files[1])).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": mocr.read(crop_files[1]).text}
    # several images in one message: their texts, one per line, in order
    both = client.post("/v1/chat/completions", json=chat_body(crop_files[1], crop_files[3])).json()
    assert both["choices"][0]["message"]["content"] == "\n".join(
        mocr.read(p).text for p in (crop_files[1], crop_files[3]))
    texts = [mocr.read(p).text for p in (crop_files[1], crop_files[3])]
    assert [r["text"] for r in both["ocr_results"]] == texts


def test_chat_completion_streams_the_text_when_asked(client: TestClient, mocr: Any,
                                                     crop_files: list[Path]) -> None:
    body = {**chat_body(crop_files[0]), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == mocr.read(crop_files[0]).text


def test_models_lists_the_served_model(client: TestClient, mocr: Any) -> None:
    assert client.get("/v1/models").json()["data"][0]["id"] == Path(mocr.model_path).name


def test_the_page_and_its_assets_are_served(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and "<html" in response.text.lower()
    assert client.get("/static/index.html").status_code == 200


# ---------------------------------------------------------------- bad requests

SMALL = Limits(max_body_mb=0.2, max_image_pixels=200 * 300, max_crops=3, request_timeout_s=60.0)


def png(width: int, height: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def bad_requests(crop: Path, page: Path) -> dict[str, tuple[dict, int, str, str]]:
    """name -> (request kwargs, status, error type, a phrase the message must contain)"""
    one = crop.read_bytes()
    page_part = [("page", ("page.jpg", page.read_bytes(), "image/jpeg"))]

    def boxes(value: str) -> dict:
        return {"url": "/ocr", "files": page_part, "data": {"boxes": value}}

    noise = bytes(range(256)) * 1200  # 307 kB: over 0.2 MB
    chat_http = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}
    return {
        "oversized body": ({"url": "/ocr", "files": [("image", ("big.png", noise, "image/png"))]},
                           413, "request_too_large", "--max_body_mb"),
        "too many pixels": ({"url": "/ocr", "files": [("image", ("wide.png", png(300, 300), "image/png"))]},
                            413, "image_too_large", "90000 pixels"),
        "too many crops": ({"url": "/ocr", "files": [("image", (f"{i}.png", one, "image/png"))
                                                      for i in range(4)]},
                           413, "too_many_crops", "--max_crops"),
        "too many boxes": (boxes(json.dumps([[0, 0, 10, 10]] * 4)), 413, "too_many_crops", "4 boxes"),
        "corrupt image": ({"url": "/ocr", "files": [("image", ("cut.png", one[: len(one) // 2],
                                                               "image/png"))]},
                          400, "invalid_image", "cut.png"),
        "not an image": ({"url": "/ocr", "files": [("image", ("notes.txt", b"hello", "text/plain"))]},
                         400, "invalid_image", "notes.txt"),
        "json to /ocr": ({"url": "/ocr", "json": {"image": "x"}}, 415, "unsupported_media_type",
                         "multipart/form-data"),
        "form to chat": ({"url": "/v1/chat/completions", "files": [("image", ("a.png", one, "image/png"))]},
                         415, "unsupported_media_type", "application/json"),
        "boxes not json": (boxes("[[0, 0, 10"), 400, "invalid_json", "boxes is not JSON"),
        "box of 3 numbers": (boxes("[[0, 0, 10]]"), 422, "invalid_boxes", "boxes[0]"),
        "box off the page": (boxes("[[0, 0, 10, 10], [500, 500, 600, 600]]"), 422, "invalid_boxes",
                             "outside the 200x300 page"),
        "page without boxes": ({"url": "/ocr", "files": page_part}, 400, "invalid_form", "boxes"),
        "unknown field": ({"url": "/ocr", "files": [("images", ("a.png", one, "image/png"))]}, 400,
                          "invalid_form", "'images'"),
        "no file at all": ({"url": "/ocr", "files": [("image", (None, b"text", None))]}, 400,
                           "invalid_form", "file part"),
        "chat not json": ({"url": "/v1/chat/completions", "content": b"{oops",
                           "headers": {"content-type": "application/json"}}, 400, "invalid_json", "not JSON"),
        "chat without image": ({"url": "/v1/chat/completions", "json": {"messages": [
            {"role": "user", "content": "OCR:"}]}}, 400, "invalid_request_error", "no image"),
        "chat image by url": ({"url": "/v1/chat/completions", "json": chat_http}, 400,
                              "invalid_request_error", "data: URI"),
        "chat bad base64": ({"url": "/v1/chat/completions", "json": {"messages": [{"role": "user", "content":
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}},
            400,
            "invalid_request_error", "base64"),
    }


BAD_NAMES = ["oversized body", "too many pixels", "too many crops", "too many boxes", "corrupt image",
             "not an image", "json to /ocr", "form to chat", "boxes not json", "box of 3 numbers",
             "box off the page", "page without boxes", "unknown field", "no file at all", "chat not json",
             "chat without image", "chat image by url", "chat bad base64"]


@pytest.fixture(scope="module")
def small_client(mocr: Any):  # noqa: ANN201
    with TestClient(create_app(mocr, SMALL)) as c:
        yield c


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_request_gets_a_json_4xx_naming_the_problem_and_the_server_keeps_serving(
        small_client: TestClient, mocr: Any, crop_files: list[Path], page_file: Path, name: str) -> None:
    kwargs, status, kind, phrase = bad_requests(crop_files[0], page_file)[name]
    response = small_client.post(**kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and phrase in error["message"], error
    good = small_client.post("/ocr", files=files([crop_files[0]]))
    assert good.status_code == 200 and good.json()["results"][0]["text"] == mocr.read(crop_files[0]).text


def test_every_bad_request_is_parametrized(crop_files: list[Path], page_file: Path) -> None:
    assert sorted(BAD_NAMES) == sorted(bad_requests(crop_files[0], page_file))


def test_a_body_without_content_length_is_cut_at_the_limit_too(small_client: TestClient) -> None:
    def chunks():  # noqa: ANN202  (a generator: httpx sends it chunked, with no Content-Length)
        for _ in range(10):
            yield b"x" * 50_000

    response = small_client.post("/ocr", content=chunks(),
                                 headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


def test_unknown_routes_and_methods_answer_json_errors(small_client: TestClient) -> None:
    assert small_client.get("/nope").json()["error"]["type"] == "not_found"
    assert small_client.get("/ocr").json()["error"]["type"] == "method_not_allowed"


class Gated:
    """MangaOcr whose first read_many waits for a gate (then answers "late" without the model): a request
    that outlives its time limit whatever the machine's speed."""

    def __init__(self, mocr: Any) -> None:
        self.mocr, self.gate = mocr, threading.Event()
        self.model_path, self.device, self.quantize, self.pixel_budget = (
            mocr.model_path, mocr.device, mocr.quantize, mocr.pixel_budget)

    def read_many(self, images: list, batch_size: int) -> list:
        if not self.gate.is_set():
            assert self.gate.wait(30)
            return [Reading("late", "eos", 1.0, 1.0) for _ in images]
        return self.mocr.read_many(images, batch_size)


def test_a_request_over_the_time_limit_gets_504_and_the_next_one_is_answered(mocr: Any,
                                                                            crop_files: list[Path]) -> None:
    gated = Gated(mocr)
    # 5 s: the second request's own read (one small crop, ~0.2 s) must fit in it on a loaded machine
    with TestClient(create_app(gated, Limits(request_timeout_s=5.0))) as c:
        late = c.post("/ocr", files=files([crop_files[0]]))
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
        assert "--request_timeout_s" in late.json()["error"]["message"]
        gated.gate.set()
        again = c.post("/ocr", files=files([crop_files[1]]))
        assert again.status_code == 200, again.text
        assert again.json()["results"][0]["text"] == mocr.read(crop_files[1]).text


def test_with_a_key_every_request_but_health_and_the_page_needs_it(mocr: Any, crop_files: list[Path]) -> None:
    with TestClient(create_app(mocr, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, url in (("post", "/ocr"), ("get", "/v1/models"), ("post", "/v1/chat/completions")):
                response = getattr(c, method)(url, headers=headers)
                assert response.status_code == 401, (headers, url)
                assert response.json()["error"]["type"] == "authentication_error"
        assert c.get("/health").status_code == 200 and c.get("/health").json()["api_key_required"] is True
        assert c.get("/").status_code == 200
        ok = c.post("/ocr", files=files([crop_files[0]]), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("args, phrase", [
    (["--host", "0.0.0.0"], "--api_key"),
    (["--max_crops", "0"], "--max_crops must be positive"),
    (["--port", "70000"], "--port"),
    (["--model_path", "/no/such/model"], "/no/such/model"),
])
def test_bad_flags_are_one_line_and_exit_2(args: list[str], phrase: str, tiny_model: Path,
                                           capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PADDLEOCR_VL_MANGA_API_KEY", raising=False)
    assert main(["--model_path", str(tiny_model), "--port", "0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and phrase in err[-1], err


def test_a_missing_server_package_is_one_line_naming_it_and_exit_2(capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # a kit updated without `pip install -r requirements.txt`: without python-multipart the server used to
    # start and answer every POST /ocr with a 500
    for module in ("python_multipart", "multipart"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["--model_path", "/no/such/model", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: serve.py needs python-multipart: pip install -r requirements.txt"


def test_a_port_in_use_is_one_line_and_exit_2(tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--model_path", str(tiny_model), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_a_second_server_cannot_take_the_port_while_the_first_loads_its_model() -> None:
    # cli binds before the model loads (minutes for the full model); a socket that is bound but not yet
    # listening lets a second SO_REUSEADDR socket bind the same port, which then fails only after its load
    from paddleocr_vl_manga.serve.cli import ServeError, bind

    with bind("127.0.0.1", 0) as first:
        with pytest.raises(ServeError, match="cannot listen on"):
            bind("127.0.0.1", first.getsockname()[1]).close()



@pytest.mark.parametrize("headers", [
    [(b"authorization", b"Bearer wrong"), (b"content-length", b"1000")],
    [(b"authorization", b"Bearer s3cret"), (b"content-length", b"999999999")],
], ids=["wrong key", "declared too large"])
def test_a_client_stalling_mid_body_gets_its_error_and_cannot_hold_the_server(mocr: Any,
                                                                                headers: list) -> None:
    # The 401 and the 413 read the rest of the body first; a client that stops sending (a laptop asleep
    # mid-upload) once held that forever, and with it Ctrl-C's graceful shutdown: --request_timeout_s bounds
    # it.
    import asyncio

    app = create_app(mocr, Limits(request_timeout_s=0.5), api_key="s3cret")
    scope = {"type": "http", "method": "POST", "path": "/ocr", "raw_path": b"/ocr", "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "http_version": "1.1", "asgi": {"version": "3.0"},
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), *headers]}
    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.Event().wait()  # the client sends nothing more, and stays connected
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    async def call() -> None:  # 60 s: only a hang reaches it
        await asyncio.wait_for(app(scope, receive, send), 60)

    asyncio.run(call())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] in (401, 413)


def test_json_nested_too_deep_is_a_400_not_a_server_error(client: TestClient, page_file: Path) -> None:
    # 200 kB of brackets, well under the body limit: json.loads raises RecursionError, no ValueError
    deep = "[" * 100_000 + "]" * 100_000
    for response in (client.post("/ocr", files=files([page_file], "page"), data={"boxes": deep}),
                     client.post("/v1/chat/completions", content=deep.encode(),
                                 headers={"content-type": "application/json"})):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_json"


def test_a_request_whose_images_together_pass_the_pixel_limit_gets_413_before_decoding(
        small_client: TestClient, page_file: Path) -> None:
    # Each image under --max_image_pixels, but not all of them together: 64 PNG bombs of 36 M pixels
    # (35 kB each, a 2 MB request) once decoded to ~27 GB and got the server killed for memory.
    each = png(150, 150)  # 22,500 pixels; SMALL allows 60,000
    uri = "data:image/png;base64," + base64.b64encode(each).decode()
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}] * 3}]}
    page_boxes = {"boxes": json.dumps([[0, 0, 200, 300]] * 2)}  # the whole 200x300 page, twice
    for response in (small_client.post("/ocr", files=[("image", (f"{i}.png", each, "image/png"))
                                                      for i in range(3)]),
                     small_client.post("/v1/chat/completions", json=chat),
                     small_client.post("/ocr", files=files([page_file], "page"), data=page_boxes)):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["type"] == "image_too_large" and "--max_image_pixels" in error["message"]
    assert small_client.post("/ocr", files=[("image", ("0.png", each, "image/png"))] * 2).status_code == 200


@pytest.mark.parametrize(("args", "batch"), [([], 16), (["--quantize", "int8"], 1),
                                             (["--quantize", "int8", "--max_batch_size", "8"], 8)])
def test_a_quantized_server_reads_each_crop_alone_unless_asked(args: list[str], batch: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """int8's activation scale is one per batch: batched, a crop's text would depend on its batch mates and
    differ from MangaOcr()'s (7 of 8 tiny-model crops did)."""
    import paddleocr_vl_manga.serve.cli as cli

    seen: list[Limits] = []
    monkeypatch.setattr(cli, "run", lambda a, limits, sock: sock.close() or seen.append(limits) or 0)
    assert main(["--model_path", "unused", "--port", "0", *args]) == 0
    assert seen[0].max_batch_size == batch
