"""The training command given bad flags directly (not through train.sh, which checks its own settings first):
one `error:` line and exit 2 before anything loads, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

import paddleocr_vl_manga.train.run as sft

BAD = [
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: need a whole number"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: need a whole number"),
    (["--max_length", "-5"], "--max_length -5: need a whole number"),
    (["--learning_rate", "abc"], "invalid float value: 'abc'"),
]


@pytest.mark.parametrize(("extra", "says"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_is_one_error_line_before_anything_loads(tmp_path: Path, capsys, extra: list[str],
                                                         says: str) -> None:
    argv = ["--model_path", str(tmp_path / "model"), "--data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra]
    with pytest.raises(SystemExit) as stop:
        sft.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing was written either
