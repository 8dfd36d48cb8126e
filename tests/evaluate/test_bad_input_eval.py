"""Issue 27 on evaluation and prediction: a model path that is not there, no hub, noise, bad flags and files.

Every user error of evaluate_model.py and predict.py is one `error:` line and exit 2, never a traceback
(the table at the end); model loading never waits on the hub's retries.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
import paddleocr_vl_manga.infer.predict as predict
import paddleocr_vl_manga.model.generation as ocr_generation
import paddleocr_vl_manga.model.loading as ocr_model
from paddleocr_vl_manga.data.dataset import DatasetError, load_image, read_jsonl, rgb_image
from paddleocr_vl_manga.model.loading import ModelLoadError, load_config_and_processor


def evaluate(tiny_model: Path, data_dir: Path, out: Path, *extra: str) -> int:
    return evaluate_model.main([
        "--model_path", str(tiny_model), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--max_new_tokens", "6", *extra,
    ])


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(autouse=True)
def fresh_hub_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides anew whether the hub is reachable (ocr_model caches that per process)."""
    if hasattr(ocr_model, "_HUB_ACCESS"):
        monkeypatch.setattr(ocr_model, "_HUB_ACCESS", {})


@pytest.fixture
def no_hub_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """transformers' loaders, made to fail at once and to record what they were asked for: a test that
    reaches them went to the hub (or would have spent its retries there)."""
    asked: list[str] = []

    def refuse(name: str, *args, **kwargs):
        asked.append(str(name))
        raise OSError(f"(test) transformers was asked to load {name}")

    monkeypatch.setattr(ocr_model.AutoConfig, "from_pretrained", refuse)
    return asked


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on return: connecting is refused at once


# ---------------------------------------------------------------- items 3 and 15: model paths, no hub


@pytest.mark.parametrize("value", ["./sft_ouput", "sft_ouput", "runs/chekpoint-5", "runz/", "{tmp}/sft_ouput"
                                   ])
def test_a_path_like_model_value_that_does_not_exist_is_named_at_once(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub_loading: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # an existing parent folder makes runs/<name> a path, not a hub id
    (tmp_path / "sft_output").mkdir()
    value = value.format(tmp=tmp_path)  # runz/: a trailing separator makes a folder, whatever is in front
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_config_and_processor(value)
    assert no_hub_loading == [] and "\n" not in str(e.value)
    if "ouput" in value:
        assert "sft_output" in str(e.value)  # the folder the user meant, beside the typo


def test_a_hub_id_whose_org_is_also_a_folder_here_says_why_the_hub_was_not_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub_loading: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "PaddlePaddle" / "PaddleOCR").mkdir(parents=True)  # a clone of github.com/PaddlePaddle/...
    with pytest.raises(ModelLoadError) as e:
        load_config_and_processor("PaddlePaddle/PaddleOCR-VL")
    assert "hub id" in str(e.value) and "another folder" in str(e.value), str(e.value)


def test_hub_id_without_network_fails_at_once_naming_both_ways_on(
    monkeypatch: pytest.MonkeyPatch, no_hub_loading: list[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ModelLoadError) as e:
        load_config_and_processor("nobody-here/no-such-model")
    message = str(e.value)
    assert no_hub_loading == [], "went on to transformers' retries after a refused connection"
    assert "cannot be reached" in message and "\n" not in message
    assert "local model folder" in message and "tools/make_tiny_model.py --release_like v1 --out" in message


def test_hub_id_with_hf_hub_offline_fails_at_once_naming_both_ways_on(
    monkeypatch: pytest.MonkeyPatch, no_hub_loading: list[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as e:
        load_config_and_processor("nobody-here/no-such-model")
    assert no_hub_loading == []
    assert "HF_HUB_OFFLINE" in str(e.value) and "make_tiny_model.py --release_like v1" in str(e.value)


def test_a_cached_hub_model_loads_without_retries_when_the_hub_cannot_be_reached(
    release_model: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import time
    import types

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    repo = tmp_path / "hub" / "models--PaddlePaddle--PaddleOCR-VL"  # as a download leaves it in the cache
    shutil.copytree(release_model("v1"), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    waits: list[float] = []  # huggingface_hub's retries sleep 1+2+4+8+8 s, one warning each
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": waits.append}))
    model, _ = ocr_model.load_model_and_processor("PaddlePaddle/PaddleOCR-VL")
    assert model is not None and waits == [], "a loader went to the unreachable hub despite the cached copy"


def test_the_hub_probe_waits_as_long_as_hf_hub_etag_timeout_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    asked: list[float] = []

    class SlowLink:  # a proxy that answers in 15 s: users raise HF_HUB_ETAG_TIMEOUT (default 10 s) for it
        def head(self, url: str, *, timeout: float, **kwargs) -> None:
            asked.append(timeout)

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 60)
    monkeypatch.setattr(huggingface_hub, "get_session", SlowLink)
    assert ocr_model._hub_files_only("nobody-here/no-such-model") is False
    assert asked == [60], "the probe gives up before huggingface_hub's own metadata request would"


def test_a_transformers_error_over_several_lines_is_one_line(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise OSError("first\nsecond")  # as transformers' "We couldn't connect ...\nCheck your ..."

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(ocr_model.AutoConfig, "from_pretrained", fail)
    with pytest.raises(ModelLoadError) as e:
        load_config_and_processor(str(tmp_path))
    assert str(e.value).endswith("first second")


def test_make_tiny_model_flags_in_the_hint_exist() -> None:
    from tools.make_tiny_model import main as make_tiny

    with pytest.raises(SystemExit) as e:  # --help: the parser accepts the hint's flags
        make_tiny(["--release_like", "v1", "--out", "x", "--help"])
    assert e.value.code == 0


# ---------------------------------------------------------------- item 7: noise


def test_loading_the_release_config_does_not_warn_about_mrope_section(release_model: Callable[[str], Path]
                                                                       ) -> None:
    from transformers import AutoConfig

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        folder = release_model("v1")
        config = AutoConfig.from_pretrained(folder)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "mrope_section" in json.loads((folder / "config.json").read_text())["rope_scaling"]
    assert config.text_config.rope_parameters["mrope_section"]  # still read, where M-RoPE reads it
    assert not [m for m in seen if "mrope_section" in m], seen


def test_training_evaluation_bar_stays_off_a_log_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import paddleocr_vl_manga.train.trainer as sft_trainer

    class NotATerminal:
        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None: ...

    monkeypatch.setattr(sys, "stderr", NotATerminal())
    bar = sft_trainer.TerminalEvalBar()
    args = TrainingArguments(output_dir="unused", report_to=[])
    bar.on_prediction_step(args, TrainerState(is_world_process_zero=True), TrainerControl(),
                           eval_dataloader=[1, 2, 3])
    assert bar.prediction_bar is None


# ---------------------------------------------------------------- item 11: an undecodable JSONL line


def test_a_shift_jis_line_in_a_jsonl_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"image": "a.png", "text": "あ"}, ensure_ascii=False)
    path = tmp_path / "test.jsonl"
    path.write_bytes((good + "\n" + good + "\n").encode("utf-8") + (good + "\n").encode("shift_jis"))
    with pytest.raises(DatasetError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: not UTF-8") and "Shift-JIS" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_windows_shift_jis_line_gets_a_conversion_that_keeps_its_characters(tmp_path: Path) -> None:
    # Windows (Notepad, Excel) writes Japanese as cp932: ① has no plain Shift-JIS code, and ～ (FF5E) would
    # come back from iconv -f SHIFT_JIS as the wave dash 〜 (301C), another character than the reference's
    line = json.dumps({"image": "a.png", "text": "①ドン～！"}, ensure_ascii=False) + "\n"
    path = tmp_path / "test.jsonl"
    path.write_bytes(line.encode("cp932"))
    with pytest.raises(DatasetError) as e:
        read_jsonl(path)
    assert "iconv -f CP932 -t UTF-8" in str(e.value)


def test_a_byte_order_mark_on_the_first_line_is_read() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.jsonl"
        path.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n", encoding="utf-8-sig")
        assert read_jsonl(path)[0]["text"] == "x"


# ---------------------------------------------------------------- item 13: image modes


def gray16_png(path: Path) -> np.ndarray:
    """A 16-bit grayscale crop (light paper, a dark glyph) saved as PNG; returns its 8-bit rendering."""
    pixels = np.full((40, 120), 58000, np.uint16)
    pixels[10:30, 20:100] = 3000
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # how Pillow opens it: not "L"
    return np.rint(pixels / 257).astype(np.uint8)


def test_a_16_bit_grayscale_crop_is_read_as_its_pixels_not_white(tmp_path: Path) -> None:
    from paddleocr_vl_manga.infer.manga_ocr import _open

    path = tmp_path / "crop16.png"
    expected = np.stack([gray16_png(path)] * 3, axis=-1)
    record = {"image_path": str(path), "_line": 1}
    for image in (load_image(record, "test.jsonl"), predict.open_image(str(path)), _open(path),
                  _open(Image.open(path))):
        assert image.mode == "RGB"
        assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1


def test_report_html_shows_a_16_bit_crop_as_the_model_read_it_not_white(tmp_path: Path) -> None:
    import base64
    import io
    import re

    from paddleocr_vl_manga.evaluate.report import image_tag

    path = tmp_path / "crop16.png"
    expected = gray16_png(path)
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', image_tag(str(path), "crop")).group(1)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("L")).astype(int)
    assert np.abs(shown - expected).max() <= 1  # 120 x 40 is below the thumbnail size: not resized


@pytest.mark.parametrize("mode", ["I", "I;16", "F", "F 0..1", "LA", "RGBA", "P", "CMYK", "L", "1"])
def test_every_mode_reads_as_the_rgb_of_the_same_picture(mode: str) -> None:
    base = Image.new("L", (16, 8), 255)  # white paper, a black glyph, a gray stroke (153: in web palettes)
    base.paste(0, (4, 2, 12, 6))
    base.paste(153, (0, 7, 16, 8))
    gray8 = np.asarray(base, np.float64)
    image = {
        "I;16": lambda: Image.fromarray((gray8 * 257).astype(np.uint16)),  # 16 bits: 65535 is white
        "F 0..1": lambda: Image.fromarray((gray8 / 255).astype(np.float32), "F"),
    }.get(mode, lambda: base.convert("RGB").convert(mode))()
    expected = np.asarray(base.convert("1").convert("L") if mode == "1" else base).astype(int)
    read = np.asarray(rgb_image(image))
    assert read.shape == (8, 16, 3)
    assert np.abs(read.astype(int) - expected[..., None]).max() <= 1


def test_transparent_pixels_are_white_paper() -> None:
    glyph = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # transparent black: convert("RGB") gives black
    glyph.putpixel((5, 5), (0, 0, 0, 255))
    pixels = np.asarray(rgb_image(glyph))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[5, 5].tolist() == [0, 0, 0]
    indexed = Image.new("P", (4, 4), 0)
    indexed.info["transparency"] = 0
    assert np.asarray(rgb_image(indexed))[0, 0].tolist() == [255, 255, 255]


# ---------------------------------------------------------------- item 4: empty answers


def answer_empty_every_other(monkeypatch: pytest.MonkeyPatch) -> None:
    from paddleocr_vl_manga.model.generation import Reading

    def readings(model, processor, chunk, **kwargs):
        return [Reading("" if i % 2 else "ア", "eos", 0.5, 0.25) for i in chunk.positions]

    monkeypatch.setattr(ocr_generation, "generate_readings", readings)


def test_empty_answers_are_counted_in_metrics_summary_and_report(
    tiny_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer_empty_every_other(monkeypatch)
    out = tmp_path / "out"
    assert evaluate(tiny_model, data_dir, out) == 0
    rows = predictions(out)
    empty = sum(r["prediction"] == "" for r in rows)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0 < empty < len(rows) and metrics["empty_answers"] == empty
    assert f"Empty answers: {100 * empty / len(rows):.2f} % ({empty} of {len(rows)})" in (
        out / "summary.md").read_text(encoding="utf-8")
    assert f"{empty} answers ({100 * empty / len(rows):.2f} %) are empty" in (
        out / "report.html").read_text(encoding="utf-8")


def metrics_file(folder: Path, cer: float, empty: int, n: int = 209) -> str:
    folder.mkdir(parents=True)
    modes = {m: {"cer": cer, "cer_mean": cer, "exact_match": 0.0} for m in ("none", "nows")}
    run = {"model_path": folder.name, "split": "test", "num_samples": n, "metrics": modes,
           "empty_answers": empty}
    (folder / "metrics.json").write_text(json.dumps(run), encoding="utf-8")
    return str(folder / "metrics.json")


def test_compare_says_a_lower_cer_with_many_empty_answers_is_no_plain_win(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = metrics_file(tmp_path / "before", 10.77, 0)
    after = metrics_file(tmp_path / "after", 0.98, 125)
    assert evaluate_model.main(["--compare", before, after]) == 0
    out = capsys.readouterr().out
    assert "| empty answers |  | 0.00 % | 59.81 % | +59.81 pp |" in out
    assert "Note: after answered nothing on 59.81 % of its crops (125 of 209)" in out
    assert "Note: before" not in out


# ---------------------------------------------------------------- item 9: Ctrl-C, one run per folder


def test_an_interrupted_run_leaves_one_run_and_the_same_command_continues_it(
    tiny_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert evaluate(tiny_model, data_dir, out, "--max_new_tokens", "5") == 0  # an earlier, complete run
    assert evaluate(tiny_model, data_dir, fresh, "--batch_size", "1") == 0  # the reference: never stopped
    capsys.readouterr()

    real = ocr_generation.generate_readings
    generated: list[int] = []

    def interrupt_second_chunk(model, processor, chunk, **kwargs):
        if len(generated) == 1:
            raise KeyboardInterrupt
        generated.append(len(chunk.positions))
        return real(model, processor, chunk, **kwargs)

    monkeypatch.setattr(ocr_generation, "generate_readings", interrupt_second_chunk)
    assert evaluate(tiny_model, data_dir, out, "--batch_size", "1") == 130  # other settings: max_new_tokens 6
    err = capsys.readouterr().err
    assert "starting over" in err and "max_new_tokens 5 -> 6" in err and "same command continues" in err
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "run.json"]  # no stale results
    assert len(predictions(out)) == generated[0] == 8
    assert json.loads((out / "run.json").read_text())["settings"]["max_new_tokens"] == 6

    generated.clear()
    monkeypatch.setattr(ocr_generation, "generate_readings", lambda *a, **k: generated.append(
        len(a[2].positions)) or real(*a, **k))
    assert evaluate(tiny_model, data_dir, out, "--batch_size", "4") == 0  # batch size: not a setting
    assert "continuing: 8 of" in capsys.readouterr().err
    total = len(predictions(fresh))
    assert sum(generated) == total - 8  # the first 8 were not generated again
    by_id = {r["id"]: r for r in predictions(fresh)}
    assert sorted(predictions(out), key=lambda r: r["id"]) == sorted(by_id.values(), key=lambda r: r["id"])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, fresh))
    assert a["metrics"] == b["metrics"] and a["num_samples"] == total and a["continued_from"] == 8


def test_a_model_copied_again_with_new_file_times_continues_and_a_retrained_one_starts_over(
    tiny_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import os
    import shutil

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model, model)
    real = ocr_generation.generate_readings
    calls: list[int] = []

    def interrupt_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ocr_generation, "generate_readings", interrupt_second_chunk)
    assert evaluate(model, data_dir, out, "--batch_size", "1") == 130
    monkeypatch.setattr(ocr_generation, "generate_readings", real)
    # a spot node that restarts the job downloads the model again (cp, aws s3 cp): same bytes, new times
    for path in [*model.iterdir(), data_dir / "test.jsonl"]:
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**11))
    capsys.readouterr()
    assert evaluate(model, data_dir, out) == 0
    assert "continuing: 8 of" in capsys.readouterr().err

    weights = model / "model.safetensors"  # retrained into the same folder: same size, other numbers
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert evaluate(model, data_dir, out) == 0
    assert "starting over" in capsys.readouterr().err


# ---------------------------------------------------------------- every bad input: exit 2, one line


def shift_jis_data(data_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    lines = (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
    sjis = json.dumps({"image": "a.png", "text": "日本"}, ensure_ascii=False) + "\n"
    utf8 = "\n".join(lines[:2]) + "\n"
    (folder / "test.jsonl").write_bytes(utf8.encode("utf-8") + sjis.encode("shift_jis"))
    return folder


# (argv after the command's own model/data/output arguments, a fragment of the one error line)
EVALUATE_BAD = [
    (["--max_new_tokens", "0"], "--max_new_tokens must be a positive number of tokens, got 0"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be a positive number of tokens, got -1"),
    (["--min_pixels", "100000", "--max_pixels", "1000"], "--min_pixels 100000 is above --max_pixels 1000"),
    (["--max_pixels", "1000"], "min_pixels 12544 is above max_pixels 1000"),  # the checkpoint's own min
    (["--min_pixels", "-5"], "--min_pixels must be a positive number of pixels"),
    (["--model_path", "./sft_ouput"], "model folder './sft_ouput' does not exist"),
    (["--model_path", "sft_ouput"], "a hub id has the form org/name"),
    (["{shift_jis}"], "test.jsonl:3: not UTF-8"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--split", "nope"], "nope.jsonl: file not found"),
]
PREDICT_BAD = [
    (["{folder}"], "is a folder: give image files"),
    (["--max_new_tokens", "0", "{crop}"], "--max_new_tokens must be a positive number of tokens, got 0"),
    (["--max_new_tokens", "-1", "{crop}"], "--max_new_tokens must be a positive number of tokens, got -1"),
    (["--min_pixels", "100000", "--max_pixels", "1000", "{crop}"], "is above --max_pixels 1000"),
    (["--max_pixels", "1000", "{crop}"], "min_pixels 12544 is above max_pixels 1000"),
    (["--model_path", "./sft_ouput", "{crop}"], "model folder './sft_ouput' does not exist"),
    (["{folder}/missing.png"], "image not found"),
    (["{crop}", "--boxes", "{folder}/none.json"], "cannot read boxes"),
]


@pytest.mark.parametrize(("extra", "expected"), EVALUATE_BAD, ids=[" ".join(a) for a, _ in EVALUATE_BAD])
def test_bad_input_to_evaluate_is_one_error_line(
    extra: list[str], expected: str, tiny_model: Path, data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, error_line: Callable[[int], str],
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--model_path", str(tiny_model), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o")]
    if extra == ["{shift_jis}"]:
        extra = ["--data_dir", str(shift_jis_data(data_dir, tmp_path / "sjis"))]
    assert expected in error_line(evaluate_model.main(argv + extra))
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.parametrize(("extra", "expected"), PREDICT_BAD, ids=[" ".join(a) for a, _ in PREDICT_BAD])
def test_bad_input_to_predict_is_one_error_line(
    extra: list[str], expected: str, tiny_model: Path, data_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, error_line: Callable[[int], str],
) -> None:
    monkeypatch.chdir(tmp_path)
    crop = read_jsonl(data_dir / "test.jsonl")[0]["image_path"]
    (tmp_path / "crops").mkdir()
    extra = [a.format(folder=tmp_path / "crops", crop=crop) for a in extra]
    assert expected in error_line(predict.main(["--model_path", str(tiny_model), *extra]))


def test_no_hub_through_evaluate_is_one_error_line(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_line: Callable[[int], str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    rc = evaluate_model.main(["--model_path", "nobody-here/no-such-model", "--data_dir", str(data_dir),
                              "--output_dir", str(tmp_path / "o")])
    assert "python tools/make_tiny_model.py --release_like v1 --out" in error_line(rc)


def test_a_rerun_after_a_torn_last_line_continues_from_the_whole_lines(
    tiny_model: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert evaluate(tiny_model, data_dir, out) == 0
    whole = predictions(out)
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:10]) + lines[10][:15], encoding="utf-8")  # kill -9
    state = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**state, "complete": False}))
    capsys.readouterr()
    assert evaluate(tiny_model, data_dir, out) == 0
    assert f"continuing: 10 of {len(whole)} predictions" in capsys.readouterr().err
    assert sorted(predictions(out), key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])


def test_a_hub_ids_new_revision_is_another_model_to_the_run_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate_model.py --model_path org/name after the hub's model changed starts over: run.json hashes the
    cached revision's files, as it does a folder's."""
    import types

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--reader"
    for revision, weights in (("aaa111", b"old"), ("bbb222", b"new")):
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "snapshots" / revision / "config.json").write_text("{}")
        (repo / "snapshots" / revision / "model.safetensors").write_bytes(weights)
    (repo / "refs").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = types.SimpleNamespace(model_path="org/reader", max_new_tokens=None)
    processor = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        size={"shortest_edge": 1, "longest_edge": 2}))
    data = tmp_path / "test.jsonl"
    data.write_text("")
    settings = {}
    for revision in ("aaa111", "bbb222"):
        (repo / "refs" / "main").write_text(revision)
        settings[revision] = evaluate_model.run_settings(args, [], str(data), processor, "float32", "all")
    assert settings["aaa111"]["model_files"] and settings["aaa111"] != settings["bbb222"]
