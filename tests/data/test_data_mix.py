"""--data_dir with several folders: weighted train mix, val/test from the first, same list on every build."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
from paddleocr_vl_manga.data.dataset import DatasetError, mixed_train_dataset, parse_data_dirs


def synth_folder(prepared: Path, dst: Path, copies: int = 3) -> Path:
    """A folder like synthesize_lines.py writes: train.jsonl only (no val/test), ids of its own."""
    dst.mkdir(parents=True, exist_ok=True)
    recs = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()]
    with open(dst / "train.jsonl", "w", encoding="utf-8") as f:
        for c in range(copies):
            for r in recs:
                rec = {**r, "id": f"synth/{c}/{r['id']}", "image": str(prepared / r["image"])}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return dst


def test_parse_data_dirs():
    assert parse_data_dirs("a  b:0.5\tC:/x/y") == [(Path("a"), 1.0), (Path("b"), 0.5), (Path("C:/x/y"), 1.0)]
    for bad in ("a b:0", "a b:-1", "", "a ./a:2"):
        with pytest.raises(DatasetError):
            parse_data_dirs(bad)


def test_mix_ratio_and_first_folder_once(prepared: Path, tmp_path: Path):
    synth = synth_folder(prepared, tmp_path / "s")
    n = sum(1 for _ in (prepared / "train.jsonl").open())
    ds, mix = mixed_train_dataset(f"{prepared} {synth}:0.5", seed=1)
    ids = Counter(r["id"] for r in ds.records)
    real = [i for i in ids if not i.startswith("synth/")]
    assert len(real) == n and all(ids[i] == 1 for i in real)  # every real crop exactly once per epoch
    assert [m["drawn"] for m in mix] == [n, round(n / 2)]  # 2:1 as asked
    assert len({i for i in ids if i.startswith("synth/")}) == round(n / 2)  # drawn without replacement
    # A capped run keeps the mix, within sampling noise.
    capped, mix = mixed_train_dataset(f"{prepared} {synth}:3", seed=1, max_samples=40)
    assert len(capped) == 40 and 22 <= mix[1]["drawn"] <= 38  # expected 30 of 40
    # A folder with fewer records than its share repeats them, each as often (give or take one).
    up, mix = mixed_train_dataset(f"{prepared}:1 {synth}:9", seed=1)
    per = Counter(r["id"] for r in up.records if r["id"].startswith("synth/"))
    assert mix[1]["drawn"] == 9 * n and max(per.values()) - min(per.values()) <= 1


def test_same_list_for_same_seed(prepared: Path, tmp_path: Path):
    synth = synth_folder(prepared, tmp_path / "s")
    spec = f"{prepared} {synth}:0.7"
    a, b = (mixed_train_dataset(spec, seed=5)[0] for _ in range(2))
    c = mixed_train_dataset(spec, seed=6)[0]
    assert [r["id"] for r in a.records] == [r["id"] for r in b.records] != [r["id"] for r in c.records]
    single = mixed_train_dataset(str(prepared), seed=5, max_samples=7)[0]  # one folder: file order, as before
    assert [r["_line"] for r in single.records] == list(range(1, 8))


def test_trainer_on_a_mix(tiny_model: Path, prepared: Path, tmp_path: Path):
    synth = synth_folder(prepared, tmp_path / "s")
    argv = ["--model_path", str(tiny_model), "--data_dir", f"{prepared} {synth}:1", "--report_to", "none",
            "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--save_strategy", "no"]
    trainer = sft_build.build_trainer(*sft_arguments.parse_args(argv))
    ids = [r["id"] for r in trainer.train_dataset.records]
    assert sum(i.startswith("synth/") for i in ids) == len(ids) // 2  # 1:1
    val = {json.loads(line)["id"] for line in (prepared / "val.jsonl").read_text().splitlines()}
    assert {r["id"] for r in trainer.eval_dataset.records} == val  # the synthetic folder has no val: fine
    mix = json.loads((tmp_path / "o" / "data_mix.json").read_text())
    assert [m["drawn"] for m in mix] == [len(ids) // 2] * 2 and mix[1]["folder"] == str(synth)
    # What resume and every DDP rank rely on: a second build draws the same list.
    again = sft_build.build_trainer(*sft_arguments.parse_args([*argv, "--resume_from_checkpoint", "auto"]))
    assert [r["id"] for r in again.train_dataset.records] == ids
