"""serve.py as users run it, on loopback only: the official openai client, concurrent clients mixing bad
requests into good ones, and Ctrl-C / SIGTERM answering the request in flight before exiting 0.

Nothing here depends on timing: the servers bind --port 0 (a free port, printed), tests wait for /health, and
the signal test holds its request open (half its body sent) until the server reports it in flight and has
logged its shutdown."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_openai_client_reads_crops_through_chat_completions(start_server: Any, mocr: Any,
                                                                crop_files: list[Path]) -> None:
    import openai

    server = start_server(env={"PADDLEOCR_VL_MANGA_API_KEY": "k3y"})  # the key from the environment
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k3y", max_retries=0)
    assert [m.id for m in client.models.list()] == [Path(mocr.model_path).name]
    for path in crop_files[:3]:
        completion = client.chat.completions.create(model="paddleocr-vl-manga", messages=[{
            "role": "user", "content": [{"type": "text", "text": "OCR:"},
                                        {"type": "image_url", "image_url": {"url": data_uri(path)}}]}])
        assert completion.choices[0].message.content == mocr.read(path).text
        assert completion.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="x", stream=True, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(crop_files[0])}}]}])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == mocr.read(crop_files[0]).text
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError, match="data: URI"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/crop.png"}}]}])
    assert server.stop() == 0


def test_concurrent_clients_mixing_bad_requests_get_manga_ocr_texts_and_the_server_stays_healthy(
        start_server: Any, mocr: Any, crop_files: list[Path]) -> None:
    server = start_server("--max_crops", "4", "--max_body_mb", "1", "--max_batch_size", "8")
    texts = {p: mocr.read(p).text for p in crop_files}  # a sequential MangaOcr, one crop at a time
    good_png = crop_files[0].read_bytes()

    def part(p: Path) -> tuple[str, tuple[str, bytes, str]]:
        return ("image", (p.name, p.read_bytes(), "image/png"))

    def request(client: httpx.Client, k: int) -> None:
        """Request k (of a fixed mix): a good one checked against `texts`, or a bad one against its error."""
        kind = k % 8
        if kind in (0, 2, 4):  # 1 to 3 crops, rotating through the files
            chosen = [crop_files[(k + j) % len(crop_files)] for j in range(1 + k % 3)]
            r = client.post("/ocr", files=[part(p) for p in chosen])
            assert r.status_code == 200, r.text
            assert [x["text"] for x in r.json()["results"]] == [texts[p] for p in chosen]
        elif kind == 6:
            p = crop_files[k % len(crop_files)]
            content = [{"type": "image_url", "image_url": {"url": data_uri(p)}}]
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == texts[p]
        else:
            bad = {
                1: ({"files": [("image", ("cut.png", good_png[:40], "image/png"))]}, 400, "invalid_image"),
                3: ({"files": [part(crop_files[0])] * 5}, 413, "too_many_crops"),
                5: ({"json": {"image": "x"}}, 415, "unsupported_media_type"),
                7: ({"files": [("image", ("big.png", b"\0" * 1_200_000, "image/png"))]}, 413,
                    "request_too_large"),
            }[kind]
            r = client.post("/ocr", **bad[0])
            assert (r.status_code, r.json()["error"]["type"]) == bad[1:], r.text

    def client_run(c: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for k in range(c, c + 8):  # 8 requests per client, each client starting at another kind
                request(client, k)
        return c

    with ThreadPoolExecutor(8) as pool:  # 8 clients x 8 requests: 32 good, 32 bad, bounded
        assert sorted(pool.map(client_run, range(8))) == list(range(8))
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["requests_in_flight"] == 0
    with httpx.Client(base_url=server.url) as client:
        request(client, 0)
    assert server.proc.poll() is None
    assert server.stop() == 0


def _wait_for(condition: Any, what: str, server: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s:\n{server.output()}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_answers_the_request_in_flight_then_exits_0(start_server: Any, mocr: Any,
                                                             crop_files: list[Path], sig: int) -> None:
    server = start_server()
    port = int(server.url.rsplit(":", 1)[1])
    body = httpx.Request("POST", f"{server.url}/ocr", files=[
        ("image", (p.name, p.read_bytes(), "image/png")) for p in crop_files[:2]])
    payload = body.read()
    head = (f"POST /ocr HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
            f"{body.headers['content-type']}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + payload[: len(payload) // 2])  # the request is in flight, its body half sent

        def in_flight() -> bool:
            return httpx.get(f"{server.url}/health").json()["requests_in_flight"] == 1

        _wait_for(in_flight, "the request in flight", server)
        server.proc.send_signal(sig)
        _wait_for(lambda: "Shutting down" in server.output(), "the shutdown", server)
        sock.sendall(payload[len(payload) // 2:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK", answer[:500]
    results = json.loads(rest.partition(b"\r\n\r\n")[2])["results"]
    assert [r["text"] for r in results] == [mocr.read(p).text for p in crop_files[:2]]
    assert server.proc.wait(60) == 0, server.output()
    assert "Traceback" not in server.output()


def test_full_vocabulary_reaches_the_servers_model(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # A fine-tune loads with lm_head restricted to its labels' tokens; a server whose readers meet rarer
    # characters needs the way off that predict.py and evaluate_model.py have.
    import paddleocr_vl_manga.infer.manga_ocr as manga_ocr
    from paddleocr_vl_manga.serve.cli import main

    seen: list[dict] = []

    def fake(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise ValueError("stop before serving")

    monkeypatch.setattr(manga_ocr, "MangaOcr", fake)
    for flag in ([], ["--full_vocabulary"]):
        assert main(["--model_path", "m", "--port", "0", *flag]) == 2
    assert [kw.get("full_vocabulary", False) for kw in seen] == [False, True]
    assert "stop before serving" in capsys.readouterr().err
