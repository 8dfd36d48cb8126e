"""Every answer in bounded time: a looping generation is stopped (repeats cut), each crop's token cap follows
its size, odd crops never raise, and MangaOcr.batch always returns one text per input (issue 20, item 5)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
from paddleocr_vl_manga.infer.manga_ocr import MangaOcr
from paddleocr_vl_manga.model.generation import (
    LOOP_MIN_SPAN,
    LoopAndCapStop,
    auto_max_new_tokens,
    generate_readings,
    loop_tail,
)
from paddleocr_vl_manga.model.loading import load_model_and_processor


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    return load_model_and_processor(str(tiny_model))


@pytest.fixture(scope="module")
def looping(loaded):
    """The tiny model made to emit one ordinary token forever (the loop PaddleOCR #17903 users hit)."""
    model, processor = loaded
    looper = copy.deepcopy(model)
    token = processor.tokenizer.convert_tokens_to_ids("あ")
    head = torch.nn.Linear(looper.lm_head.in_features, looper.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 10.0
    looper.lm_head = head
    return looper, processor


def test_loop_tail() -> None:
    assert loop_tail([5] * (LOOP_MIN_SPAN - 1)) == 0  # "ドドド…" shorter than the span is text
    assert loop_tail([7, 8] + [5] * LOOP_MIN_SPAN) == LOOP_MIN_SPAN - 1  # one pass kept
    assert loop_tail([1, 2, 3] * 8) == 21 and loop_tail([9] + [1, 2, 3, 4, 5, 6] * 4) == 18
    assert loop_tail(list(range(60))) == 0 and loop_tail([1, 2, 3] * 7) == 0
    # the criterion generate() uses, on the device, agrees with loop_tail row by row
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        n, reps = rng.randint(1, 14), rng.randint(1, 30)
        rows.append(([rng.randint(0, 5) for _ in range(rng.randint(0, 5))] + [rng.randint(0, 3)
                     for _ in range(n)] * reps)[-40:])
    width = max(map(len, rows))
    rows = [[rng.randint(10, 99) for _ in range(width - len(r))] + r for r in rows]  # unrelated prefixes
    done = LoopAndCapStop(0, torch.full((len(rows),), 10_000))(torch.tensor(rows))
    assert done.tolist() == [loop_tail(r) > 0 for r in rows] and 0 < int(done.sum()) < len(rows)


def test_auto_cap_follows_the_crop() -> None:
    assert auto_max_new_tokens(12, 12) == 18 and auto_max_new_tokens(100, 300) == 256
    assert auto_max_new_tokens(40, 200) == 96 and auto_max_new_tokens(1, 1) == 17


def test_a_looping_model_is_stopped_and_capped(looping) -> None:
    model, processor = looping
    big, tiny = Image.new("RGB", (120, 300), "white"), Image.new("RGB", (12, 12), "white")
    loop, cap = generate_readings(model, processor, [big, tiny])
    assert loop[:2] == ("あ", "loop")  # stopped after LOOP_MIN_SPAN tokens instead of 256, one pass kept
    assert cap[:2] == ("あ" * 18, "cap")  # a 12 x 12 crop holds no 24-token answer: its cap (18) came first
    fixed = generate_readings(model, processor, [big], max_new_tokens=10)
    assert [r[:2] for r in fixed] == [("あ" * 10, "cap")]


@pytest.mark.parametrize("size", [(0, 0), (1, 1), (10, 2100), (2100, 10), (3, 3)])
def test_odd_crops_are_answered(loaded, size: tuple[int, int]) -> None:
    model, processor = loaded
    readings = generate_readings(model, processor, [Image.new("RGB", size, "white")], max_new_tokens=4)
    assert len(readings) == 1 and isinstance(readings[0].text, str)


def test_batch_always_returns_one_text_per_input(loaded, data_dir: Path, tmp_path: Path) -> None:
    model, processor = loaded
    mocr = MangaOcr.from_model(model, processor, max_new_tokens=4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    crop = json.loads((data_dir / "test.jsonl").read_text().splitlines()[0])
    good = str(data_dir / crop["image"])
    inputs = [good, str(broken), Image.new("RGB", (0, 0)), Image.new("RGB", (10, 2100)), str(tmp_path / "no")]
    with pytest.warns(UserWarning, match="unreadable input"):
        texts = mocr.batch(inputs)
    assert len(texts) == 5 and texts[1] == texts[4] == "" and texts[0] == mocr(good)
    with pytest.raises(ValueError, match="must be a path or PIL.Image"):
        mocr(b"bytes")  # a wrong type in a single call is the caller's bug, as in manga-ocr


def test_evaluate_reports_how_answers_ended(tiny_model: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert evaluate_model.main(["--model_path", str(tiny_model), "--data_dir", str(data_dir),
                                "--output_dir", str(out), "--max_new_tokens", "3"]) == 0
    res = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(res["stops"].values()) == res["num_samples"] == len(rows)
    assert {r["stop"] for r in rows} <= {"eos", "cap", "loop"}
    if res["stops"]["cap"]:  # a random tiny model rarely ends in 3 tokens
        assert "hit the cap of 3 tokens" in (out / "summary.md").read_text()
        assert "hit their token cap" in (out / "report.html").read_text()


def test_generation_workers_only_where_they_fork(monkeypatch) -> None:
    import multiprocessing

    from paddleocr_vl_manga.model.generation import default_num_workers

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert default_num_workers("cuda") == 0  # each spawned worker would import torch at every call
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert default_num_workers("cpu") == 0 and default_num_workers("cuda") == min(2, len(
        __import__("os").sched_getaffinity(0)) - 1)
