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

import pytest

import ocr_model
from ocr_model import ModelLoadError, load_config_and_processor


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

    import sft_paddleocr_vl as sft

    class NotATerminal:
        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None: ...

    monkeypatch.setattr(sys, "stderr", NotATerminal())
    bar = sft.TerminalEvalBar()
    args = TrainingArguments(output_dir="unused", report_to=[])
    bar.on_prediction_step(args, TrainerState(is_world_process_zero=True), TrainerControl(),
                           eval_dataloader=[1, 2, 3])
    assert bar.prediction_bar is None
