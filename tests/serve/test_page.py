"""The page at GET / (paddleocr_vl_manga/serve/static/index.html) in headless Chromium, against the server.

serve.py runs on the tiny fixture model on a free loopback port (tests/serve/conftest.py's ServerProcess), and
every text the page shows is checked against `MangaOcr` (the `mocr` fixture) on the same model and crop.

Why Playwright driving the system Chromium rather than Selenium with Debian's chromium-driver: Playwright's
Python package brings its own driver and talks to the browser over the DevTools protocol, so it works with
whatever Chromium the machine has (`executable_path`, no browser download) and needs no chromedriver of the
browser's exact version, which for Selenium would be one more apt package in .ci/run (Selenium's own driver
manager would download one, which an offline machine cannot). It also sets a file input's files, builds a
real DataTransfer for a drop and waits on conditions, so nothing here sleeps. Without Chromium or Playwright
the tests are skipped, saying why, as tests/evaluate/test_report.py's browser test is.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serve.conftest import ServerProcess  # serve.py --port 0 in a subprocess, once /health answers
from tools.write_docs import chromium_binary

MAX_CROPS = 2  # the server's --max_crops: a read of 3+ crops takes the page several requests, in order

pytestmark = [
    pytest.mark.skipif(chromium_binary() is None,
                       reason="no Chromium on this machine (.ci/run installs Debian's chromium when it can)"),
]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -r requirements-dev.txt)")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = ServerProcess(tiny_model, log, "--max_crops", str(MAX_CROPS))
    yield process.url
    process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_binary(),
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server: str) -> Iterator:
    """A fresh tab (its own sessionStorage) at 1400 px on the page; fails the test on any script error or any
    request that leaves the server (the page is self-contained: no CDN, works offline)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("request", lambda r: r.url.startswith((server + "/", "data:", "blob:")) or errors.append(r.url))
    tab.goto(server + "/")
    tab.wait_for_function("document.querySelector('#server').textContent.includes('device')")
    yield tab
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def release_page(synthetic_release: Path) -> tuple[Path, Path, dict[int, list[tuple[int, int, int, int]]]]:
    """(page 001's image, its book's XML, {page index: its <text> boxes}): the release's first book."""
    book = (synthetic_release / "books.txt").read_text(encoding="utf-8").split()[0]
    xml = synthetic_release / "annotations" / f"{book}.xml"
    boxes = {int(p.get("index")): [tuple(int(t.get(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                                   for t in p.iter("text")]
             for p in ET.parse(xml).getroot().iter("page")}
    assert len(boxes) > 1 and all(boxes.values())  # several pages, each with text: the page choice matters
    return synthetic_release / "images" / book / "001.jpg", xml, boxes


@pytest.fixture(scope="module")
def crops(release_page, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three PNG crops: page 001's text boxes, then page 002's first (more crops than one request takes)."""
    image, _, boxes = release_page
    out = tmp_path_factory.mktemp("crops")
    cut = [Image.open(image).crop(b) for b in boxes[1]]
    cut.append(Image.open(image.with_name("002.jpg")).crop(boxes[2][0]))
    paths = [out / f"crop{i}.png" for i in range(len(cut))]
    for im, path in zip(cut, paths, strict=True):
        im.save(path)
    assert len(paths) > MAX_CROPS
    return paths


def drop(tab, selector: str, files: list[Path]) -> None:
    """Dispatch a real drop event carrying these files on an element, as a file dragged from the desktop."""
    payload = [{"name": f.name, "type": mimetypes.guess_type(f.name)[0] or "application/octet-stream",
                "b64": base64.b64encode(f.read_bytes()).decode()} for f in files]
    tab.evaluate("""([selector, files]) => {
        const data = new DataTransfer();
        for (const f of files) {
            const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
            data.items.add(new File([bytes], f.name, { type: f.type }));
        }
        document.querySelector(selector).dispatchEvent(
            new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
    }""", [selector, payload])


def rendered(tab, count: int) -> list[dict]:
    """Wait until `count` result lines are read (or an error shows), then each line as the page shows it."""
    tab.wait_for_function("""(n) => !document.querySelector('#error').hidden
        || (document.querySelectorAll('#results .line').length === n
            && !document.querySelector('#results .line.pending'))""", arg=count, timeout=180_000)
    assert tab.locator("#error").is_hidden(), tab.inner_text("#error")
    return tab.evaluate("""() => [...document.querySelectorAll('#results .line')].map((li) => ({
        text: li.querySelector('.text').textContent, confidence: Number(li.dataset.confidence),
        stop: li.dataset.stop, box: li.dataset.box || null, low: li.classList.contains('low'),
        imageSize: [li.querySelector('img').naturalWidth, li.querySelector('img').naturalHeight],
        meta: li.querySelector('.meta').textContent}))""")


def expect_readings(lines: list[dict], readings: list) -> None:
    assert [line["text"] for line in lines] == [r.text for r in readings]
    assert [line["stop"] for line in lines] == [r.stop for r in readings]
    for line, r in zip(lines, readings, strict=True):
        assert line["confidence"] == pytest.approx(r.confidence, rel=1e-3, abs=1e-6)
        assert f"stop: {r.stop}" in line["meta"]


def test_dropped_crops_show_each_crop_beside_its_text_confidence_and_stop(page, crops, mocr) -> None:
    drop(page, "#crop-drop", crops)
    lines = rendered(page, len(crops))
    expect_readings(lines, [mocr.read(c) for c in crops])
    assert [line["imageSize"] for line in lines] == [list(Image.open(c).size) for c in crops]


def test_picked_crops_are_read_as_when_dropped(page, crops, mocr) -> None:
    page.set_input_files("#crop-input", [str(c) for c in reversed(crops)])
    expect_readings(rendered(page, len(crops)), [mocr.read(c) for c in reversed(crops)])


def test_low_confidence_lines_follow_the_threshold_slider(page, crops, mocr) -> None:
    confidences = [mocr.read(c).confidence for c in crops]
    page.set_input_files("#crop-input", [str(c) for c in crops])
    lines = rendered(page, len(crops))
    assert page.input_value("#threshold") == "0.5"  # the default
    for threshold in ("0.5", "0", "1"):
        page.fill("#threshold", threshold)
        lines = rendered(page, len(crops))
        low = [c < float(threshold) for c in confidences]
        assert [line["low"] for line in lines] == low
        assert page.locator("#results .line.low .badge").count() == sum(low)  # in words too
    assert "geometric mean" in page.get_attribute("#threshold-label", "title")  # the tooltip says why


def test_copy_buttons_put_one_line_or_all_lines_on_the_clipboard(browser, server, crops, mocr) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    tab = context.new_page()
    tab.goto(server + "/")
    tab.set_input_files("#crop-input", [str(c) for c in crops])
    texts = [line["text"] for line in rendered(tab, len(crops))]
    assert texts == [mocr.read(c).text for c in crops]
    tab.get_by_role("button", name="Copy line 2").click()
    assert tab.evaluate("navigator.clipboard.readText()") == texts[1]
    tab.get_by_role("button", name="Copy all").click()
    assert tab.evaluate("navigator.clipboard.readText()") == "\n".join(texts)
    context.close()


def test_page_with_its_manga109_xml_reads_the_text_boxes_of_the_page_its_file_name_says(
        page, release_page, mocr) -> None:
    image, xml, boxes = release_page
    drop(page, "#page-drop", [image, xml])
    lines = rendered(page, len(boxes[1]))
    assert [line["box"] for line in lines] == [",".join(map(str, b)) for b in boxes[1]]
    expect_readings(lines, [mocr.read(Image.open(image).crop(b)) for b in boxes[1]])
    assert page.locator("#boxes rect").count() == len(boxes[1])
    assert page.input_value("#page-index") == "1"
    # The book's next page image alone: the XML stays, and 002.jpg picks page 2's boxes.
    following = image.with_name("002.jpg")
    page.set_input_files("#page-input", str(following))
    lines = rendered(page, len(boxes[2]))
    assert [line["box"] for line in lines] == [",".join(map(str, b)) for b in boxes[2]]
    expect_readings(lines, [mocr.read(Image.open(following).crop(b)) for b in boxes[2]])


def test_page_whose_file_name_has_no_number_waits_for_the_page_to_be_picked(
        page, release_page, mocr, tmp_path) -> None:
    image, xml, boxes = release_page
    unnamed = tmp_path / "scan.jpg"
    unnamed.write_bytes(image.read_bytes())
    page.set_input_files("#page-input", [str(unnamed), str(xml)])
    page.wait_for_selector("#page-choice", state="visible")
    assert "pick the page" in page.inner_text("#page-hint") and page.locator("#results .line").count() == 0
    page.select_option("#page-index", "1")
    expect_readings(rendered(page, len(boxes[1])), [mocr.read(Image.open(image).crop(b)) for b in boxes[1]])


def test_page_with_a_boxes_json_reads_those_boxes(page, release_page, mocr, tmp_path) -> None:
    image, _, boxes = release_page
    chosen = [list(b) for b in boxes[1][::-1]]  # not the XML's order: the page keeps the JSON's
    (tmp_path / "boxes.json").write_text(json.dumps(chosen))
    drop(page, "#page-drop", [image, tmp_path / "boxes.json"])
    lines = rendered(page, len(chosen))
    assert [line["box"] for line in lines] == [",".join(map(str, b)) for b in chosen]
    expect_readings(lines, [mocr.read(Image.open(image).crop(tuple(b))) for b in chosen])


def test_a_box_dragged_on_the_page_is_read(page, release_page, mocr) -> None:
    image, _, boxes = release_page
    page.set_input_files("#page-input", str(image))
    shown = page.locator("#page-img").bounding_box()
    width, height = Image.open(image).size
    x0, y0, x1, y1 = boxes[1][0]  # drag over the first text box, from its corner to the opposite one

    def to_screen(x: float, y: float) -> tuple[float, float]:
        return shown["x"] + x * shown["width"] / width, shown["y"] + y * shown["height"] / height

    page.mouse.move(*to_screen(x0, y0))
    page.mouse.down()
    page.mouse.move(*to_screen((x0 + x1) / 2, (y0 + y1) / 2))
    page.mouse.move(*to_screen(x1, y1))
    page.mouse.up()
    page.get_by_role("button", name="Read 1 box").click()
    (line,) = rendered(page, 1)
    box = tuple(map(int, line["box"].split(",")))
    scale = max(width / shown["width"], height / shown["height"])  # one screen pixel in image pixels
    assert all(abs(a - b) <= scale + 1 for a, b in zip(box, boxes[1][0], strict=True)), (box, boxes[1][0])
    expect_readings([line], [mocr.read(Image.open(image).crop(box))])


def test_server_errors_show_their_message_and_the_next_read_works(page, crops, mocr, server,
                                                                  tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG at all")
    answer = httpx.post(server + "/ocr", files=[("image", ("broken.png", broken.read_bytes(), "image/png"))])
    assert 400 <= answer.status_code < 500
    page.set_input_files("#crop-input", str(broken))
    page.wait_for_selector("#error", state="visible")
    assert page.inner_text("#error") == answer.json()["error"]["message"]
    page.set_input_files("#crop-input", str(crops[0]))
    expect_readings(rendered(page, 1), [mocr.read(crops[0])])


def test_page_asks_for_the_api_key_on_401_then_remembers_it(browser, tiny_model, crops, mocr,
                                                            tmp_path) -> None:
    server = ServerProcess(tiny_model, tmp_path / "serve.log", "--api_key", "s3cret")
    url = server.url
    try:
        tab = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        tab.goto(url + "/")
        tab.set_input_files("#crop-input", str(crops[0]))
        tab.wait_for_selector("#error", state="visible")
        assert tab.locator("#results .line.pending").count() == 1  # kept, to be read once the key is given
        tab.get_by_label("API key").fill("wrong")
        tab.get_by_role("button", name="Use key and retry").click()
        tab.wait_for_selector("#key-form", state="visible")  # a wrong key is asked again, not kept
        tab.get_by_label("API key").fill("s3cret")
        tab.get_by_role("button", name="Use key and retry").click()
        expect_readings(rendered(tab, 1), [mocr.read(crops[0])])
        assert tab.evaluate("Object.values(sessionStorage)") == ["s3cret"]
        tab.reload()  # the same tab: sessionStorage keeps the key, so no question this time
        tab.set_input_files("#crop-input", str(crops[1]))
        expect_readings(rendered(tab, 1), [mocr.read(crops[1])])
        assert tab.locator("#key-form").is_hidden()
        tab.context.close()
    finally:
        server.stop()


def test_layout_fits_1400px_and_a_phone_and_every_control_is_labelled(page, release_page) -> None:
    image, xml, boxes = release_page
    page.set_input_files("#page-input", [str(image), str(xml)])
    rendered(page, len(boxes[1]))
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= width
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                       && !e.textContent.trim())
        .map((e) => e.outerHTML)""")
    assert unnamed == []
