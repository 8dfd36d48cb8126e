"""predict.py: crops, page + boxes, page + Manga109 XML, and bad input; plus the bench_eval.py smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

import paddleocr_vl_manga.infer.predict as predict
from paddleocr_vl_manga.data.dataset import read_jsonl
from paddleocr_vl_manga.model.generation import generate_readings, generate_texts
from paddleocr_vl_manga.model.loading import load_model_and_processor

REPO = Path(__file__).resolve().parents[2]
TOKENS = ["--max_new_tokens", "6"]


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    return load_model_and_processor(str(tiny_model))


def expected_texts(loaded, images: list) -> list[str]:
    return generate_texts(*loaded, images, batch_size=1, max_new_tokens=6)


def page_of(synthetic_release: Path, records: list[dict]) -> tuple[str, int, Path, Path]:
    book, page = records[0]["book"], records[0]["page"]
    return book, page, synthetic_release / "images" / book / f"{page:03d}.jpg", (
        synthetic_release / "annotations" / f"{book}.xml")


def test_crops_print_path_and_text(tiny_model: Path, data_dir: Path, loaded,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    records = read_jsonl(data_dir / "test.jsonl")[:5]
    paths = [r["image_path"] for r in records]
    assert predict.main(["--model_path", str(tiny_model), *paths, "--batch_size", "2", *TOKENS]) == 0
    lines = capsys.readouterr().out.splitlines()
    texts = expected_texts(loaded, [Image.open(p).convert("RGB") for p in paths])
    escaped = [t.replace("\n", "\\n").replace("\t", "\\t") for t in texts]
    assert lines == [f"{p}\t{t}" for p, t in zip(paths, escaped, strict=True)]


def expected_records(loaded, paths: list[str]) -> list[dict]:
    readings = generate_readings(*loaded, [Image.open(p).convert("RGB") for p in paths], batch_size=1,
                                 max_new_tokens=6)
    return [{"image": p, "text": r.text, "stop": r.stop, "confidence": pytest.approx(r.confidence, abs=1e-5),
             "min_probability": pytest.approx(r.min_probability, abs=1e-5)}
            for p, r in zip(paths, readings, strict=True)]


def test_crops_to_jsonl_with_confidence_and_stop(tiny_model: Path, data_dir: Path, loaded,
                                                 tmp_path: Path) -> None:
    paths = [r["image_path"] for r in read_jsonl(data_dir / "val.jsonl")[:3]]
    out = tmp_path / "p.jsonl"
    assert predict.main(["--model_path", str(tiny_model), *paths, "--output", str(out), *TOKENS]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == expected_records(loaded, paths)


def test_json_prints_one_object_per_input_with_text_confidence_and_stop(
        tiny_model: Path, data_dir: Path, loaded, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [r["image_path"] for r in read_jsonl(data_dir / "test.jsonl")[:4]]
    argv = ["--model_path", str(tiny_model), *paths, "--json", "--batch_size", "2", *TOKENS]
    assert predict.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == expected_records(loaded, paths)
    assert all(0.0 <= r["min_probability"] <= r["confidence"] <= 1.0 and r["stop"] in ("eos", "cap", "loop")
               for r in rows)


def test_page_with_boxes_json(tiny_model: Path, synthetic_release: Path, loaded, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    page = next((synthetic_release / "images").glob("*/001.jpg"))
    boxes = [[10, 20, 60, 200], {"bbox": [300.4, 100, 420, 160.6], "id": "b2"}, [-5, -5, 30, 40]]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "p.jsonl"
    argv = ["--model_path", str(tiny_model), str(page), "--boxes", str(tmp_path / "boxes.json"), *TOKENS]
    assert predict.main([*argv, "--output", str(out)]) == 0
    clipped = [[10, 20, 60, 200], [300, 100, 420, 161], [0, 0, 30, 40]]
    im = Image.open(page).convert("RGB")
    texts = expected_texts(loaded, [im.crop(b) for b in clipped])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["bbox"] for r in rows] == clipped and [r["text"] for r in rows] == texts
    assert rows[1]["id"] == "b2" and all(r["image"] == str(page) for r in rows)
    assert all({"confidence", "min_probability", "stop"} <= r.keys() for r in rows)

    assert predict.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0].split("\t")
    assert first[:2] == [str(page), "10,20,60,200"]


def test_page_with_manga109_xml_matches_prepare(tiny_model: Path, synthetic_release: Path, data_dir: Path,
                                                tmp_path: Path) -> None:
    records = read_jsonl(data_dir / "train.jsonl")
    book, page, image, xml = page_of(synthetic_release, records)
    expected = [r for r in records if (r["book"], r["page"]) == (book, page)]
    out = tmp_path / "p.jsonl"
    argv = [str(image), "--manga109_xml", str(xml), "--page", str(page), "--output", str(out)]
    assert predict.main(["--model_path", str(tiny_model), *argv, *TOKENS]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Same boxes, clipping and filtering as the prepared dataset, in XML order.
    assert [(r["bbox"], r["id"], r["reference"]) for r in rows] == [
        (r["bbox"], r["text_id"], r["text"]) for r in expected]


def test_bad_input(tiny_model: Path, synthetic_release: Path, data_dir: Path, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], error_line: Callable[[int], str]) -> None:
    model = ["--model_path", str(tiny_model), *TOKENS]
    crop = read_jsonl(data_dir / "test.jsonl")[0]["image_path"]
    book, page, image, xml = page_of(synthetic_release, read_jsonl(data_dir / "train.jsonl"))

    rc = predict.main([*model, crop, str(tmp_path / "nope.png")])
    assert "image not found" in error_line(rc) and capsys.readouterr().out == ""
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("kept\n")
    rc = predict.main(["--model_path", str(tmp_path / "no_model"), crop, "--output", str(earlier)])
    assert "does not exist" in error_line(rc)
    assert earlier.read_text() == "kept\n"  # not truncated by a run that never started
    boxes = [*model, str(image), "--boxes", str(tmp_path / "b.json")]
    (tmp_path / "b.json").write_text("[[10, 10, 5, 50]]")
    assert "b.json[0]" in error_line(predict.main(boxes))
    (tmp_path / "b.json").write_text('{"bbox": [1, 2, 3, 4]}')
    assert "JSON list" in error_line(predict.main(boxes))
    rc = predict.main([*model, str(image), "--manga109_xml", str(xml), "--page", "99"])
    assert "no page with index 99" in error_line(rc)
    rc = predict.main([*model, str(image), "--page", "1"])
    assert "go together" in error_line(rc)
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100), "white").save(small)
    rc = predict.main([*model, str(small), "--manga109_xml", str(xml), "--page", str(page)])
    assert "the image is 100x100" in error_line(rc)


def test_unreadable_crop_keeps_earlier_output(tiny_model: Path, data_dir: Path, tmp_path: Path,
                                              error_line: Callable[[int], str]) -> None:
    paths = [r["image_path"] for r in read_jsonl(data_dir / "train.jsonl")[:8]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "p.jsonl"
    rc = predict.main(["--model_path", str(tiny_model), *paths, str(broken), "--batch_size", "1",
                       "--output", str(out), *TOKENS])
    assert f"cannot open image {broken}" in error_line(rc)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 8  # the first chunk (8 x batch 1)


def test_cli_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "predict.py", "--model_path", str(tmp_path / "missing"), str(tmp_path / "a.png")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: image not found")


def test_bench_eval_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_eval.py", "--model", "tiny", "--num_samples", "8",
         "--max_new_tokens", "4", "--books", "1", "--pages", "2", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio: " in proc.stdout and "identical texts: 8/8" in proc.stdout
    assert "device: cpu" in proc.stdout


def test_predictions_do_not_depend_on_num_workers(tiny_model: Path, synthetic_release: Path, data_dir: Path,
                                                  tmp_path: Path) -> None:
    paths = [r["image_path"] for r in read_jsonl(data_dir / "train.jsonl")[:11]]
    page = next((synthetic_release / "images").glob("*/002.jpg"))
    boxes = [[20 * k, 10 * k, 20 * k + 40 + 9 * k, 10 * k + 200 - 13 * k] for k in range(11)]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    for name, argv in (("crops", paths), ("page", [str(page), "--boxes", str(tmp_path / "boxes.json")])):
        outs = []
        for workers in ("0", "2"):
            outs.append(tmp_path / f"{name}{workers}.jsonl")
            # batch 1 -> chunks of 8 for 11 crops: the workers also prefetch across a chunk boundary
            assert predict.main(["--model_path", str(tiny_model), *argv, "--batch_size", "1", *TOKENS,
                                 "--num_workers", workers, "--output", str(outs[-1])]) == 0
        text = outs[0].read_text(encoding="utf-8")
        assert len(text.splitlines()) == 11 and text == outs[1].read_text(encoding="utf-8")


def test_unreadable_crop_in_a_worker_is_one_error_line(tiny_model: Path, data_dir: Path, tmp_path: Path,
                                                       error_line: Callable[[int], str]) -> None:
    paths = [r["image_path"] for r in read_jsonl(data_dir / "train.jsonl")[:10]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "p.jsonl"
    rc = predict.main(["--model_path", str(tiny_model), *paths[:8], str(broken), *paths[8:], "--batch_size",
                       "1", "--num_workers", "2", "--output", str(out), *TOKENS])
    assert error_line(rc) == f"error: cannot open image {broken} (cannot identify image file {str(broken)!r})"
    assert len(out.read_text(encoding="utf-8").splitlines()) == 8  # the first chunk (8 x batch 1)


def test_bench_eval_num_workers_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_eval.py", "--model", "tiny", "--num_samples", "8",
         "--max_new_tokens", "4", "--books", "1", "--pages", "2", "--repeats", "1", "--num_workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "generate_texts from files, 1 loader workers" in proc.stdout
    assert "texts as in memory: 16/16" in proc.stdout and "waited" in proc.stdout


def test_unreadable_file_is_not_called_padded(tiny_model: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert predict.main(["--model_path", str(tiny_model), str(broken), *TOKENS]) == 2
    err = capsys.readouterr().err
    assert "warning:" not in err and f"error: cannot open image {broken}" in err, err
