"""Bad input through each command's `main`: exit 2, one `error:` line on stderr, never a traceback (README's
promise), and no output folder where nothing could be made."""

from __future__ import annotations

from pathlib import Path

import pytest

import paddleocr_vl_manga.data.manga109 as prep
import paddleocr_vl_manga.data.synth.run as synth
import paddleocr_vl_manga.export.layout as export_model

COMMANDS = {"prepare": prep.main, "synthesize": synth.main, "export": export_model.main}
PREP = ["--manga109_root", "{release}", "--output_dir", "{t}/o", "--num_workers", "1"]
SYNTH = ["--out", "{t}/synth", "--num_lines", "5", "--num_workers", "1"]
# (command, what is wrong, argv with {t} = a temp folder holding the files below, {release} = a synthetic
# release, {ckpt} = a release-like model that names no base; the words the error line must hold)
CASES = [
    ("prepare", "root missing", ["--manga109_root", "{t}/nope"], "not found"),
    ("prepare", "root not a release", ["--manga109_root", "{t}/empty", "--output_dir", "{t}/o"],
     "is not a Manga109 release"),
    ("prepare", "output inside the release", [*PREP, "--output_dir", "{release}/o"], "inside the dataset"),
    ("prepare", "output is a file", [*PREP, "--output_dir", "{t}/file"], "is a file, not a folder"),
    ("prepare", "fraction above 1", [*PREP, "--test_fraction", "1.5"], "a fraction"),
    ("prepare", "negative fraction", [*PREP, "--val_fraction", "-0.1"], "a fraction"),
    ("prepare", "fraction not a number", [*PREP, "--test_fraction", "abc"], "invalid float value"),
    ("prepare", "negative margin", [*PREP, "--margin", "-3"], "at least 0"),
    ("prepare", "unknown split mode", [*PREP, "--split_mode", "page"], "invalid choice"),
    ("prepare", "misspelt flag", [*PREP, "--num_wrokers", "2"], "unrecognized arguments"),
    ("prepare", "val list missing", [*PREP, "--val_books", "{t}/nope.txt"], "No such file"),
    ("prepare", "val list names an unknown book", [*PREP, "--val_books", "{t}/file"], "not in this release"),
    ("synthesize", "vertical share 2", [*SYNTH, "--vertical_share", "2"], "from 0 to 1"),
    ("synthesize", "negative vertical share", [*SYNTH, "--vertical_share", "-0.5"], "from 0 to 1"),
    ("synthesize", "share not a number", [*SYNTH, "--vertical_share", "most"], "invalid float value"),
    ("synthesize", "out is a file", [*SYNTH, "--out", "{t}/file"], "is a file, not a folder"),
    ("synthesize", "out below a file", [*SYNTH, "--out", "{t}/file/lines"], "Not a directory"),
    ("synthesize", "shard beyond N", [*SYNTH, "--shard", "3/2"], "1 <= K <= N"),
    ("synthesize", "shard not K/N", [*SYNTH, "--shard", "half"], "expected K/N"),
    ("synthesize", "no lines", [*SYNTH, "--num_lines", "0"], ">= 1"),
    ("synthesize", "manga109_dir missing", [*SYNTH, "--manga109_dir", "{t}/nope"], "not found"),
    ("synthesize", "manga109_dir with a broken line", [*SYNTH, "--manga109_dir", "{t}/broken"],
     "train.jsonl:2: not a record"),
    ("export", "checkpoint missing", ["{t}/nope", "--out", "{t}/x"], "does not exist"),
    ("export", "no --out", ["{ckpt}"], "required: --out"),
    ("export", "out is a file", ["{ckpt}", "--out", "{t}/file"], "is a file, not a folder"),
    ("export", "out not empty", ["{ckpt}", "--out", "{t}/full"], "exists and is not empty"),
    ("export", "unknown GGUF type", ["{ckpt}", "--out", "{t}/x", "--gguf_type", "q4_0"], "invalid choice"),
    ("export", "checkpoint names no base", ["{ckpt}", "--out", "{t}/x"], "does not say which base"),
    ("export", "base folder missing", ["{ckpt}", "--out", "{t}/x", "--base", "{t}/base"], "is not a folder"),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("an earlier export\n")
    (tmp_path / "broken").mkdir()  # a prepared folder whose train.jsonl was cut off mid-record
    (tmp_path / "broken" / "train.jsonl").write_text('{"text": "ok"}\n{"text": "cut off\n', encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(("command", "wrong", "argv", "expected"), CASES,
                         ids=[f"{c}: {w}" for c, w, _, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(command: str, wrong: str, argv: list[str], expected: str,
                                          bad_files: Path, synthetic_release: Path, release_model, capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # none of these may wait on the hub
    monkeypatch.chdir(bad_files)
    values = {"t": str(bad_files), "release": str(synthetic_release)}
    if "{ckpt}" in argv:
        values["ckpt"] = str(release_model("v1"))
    capsys.readouterr()  # building the model prints progress bars
    rc = COMMANDS[command]([a.format(**values) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    made = {p.name for p in bad_files.iterdir()} | {p.name for p in synthetic_release.iterdir()}
    assert not made & {"o", "x", "synth"} and not [n for n in made if n.startswith(".")], made
