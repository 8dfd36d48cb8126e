"""One owner of sample lengths: crops the processor refuses, augmentation's worst case, every split filtered
by one rule, the CER sample spread over the val books, the base model at step 0, counts that survive loader
workers (issue 19's defects 2-5, each with a test that fails without its fix)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from transformers import TrainingArguments

import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.run as sft
from paddleocr_vl_manga.data.collator import OCRCollator, generation_batch, num_image_tokens
from paddleocr_vl_manga.data.dataset import OCRDataset, fit_image, fitted_size, read_jsonl, spread_sample
from paddleocr_vl_manga.data.lengths import SUMMARY_FILE, sequence_lengths
from paddleocr_vl_manga.model.loading import load_model_and_processor


@pytest.fixture(scope="module")
def processor(tiny_model: Path):
    return load_model_and_processor(str(tiny_model))[1]


def write_split(dst: Path, name: str, records: list[dict], src: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            keep = {k: v for k, v in r.items() if not k.startswith("_") and k != "image_path"}
            f.write(json.dumps({**keep, "image": str(src / r["image"])}, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("size", [(10, 2100), (2100, 10), (1, 1), (1, 400), (3, 5000), (12, 12), (0, 7)])
def test_crops_the_processor_refuses_are_padded_into_shape(processor, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (0, 0, 0))
    fitted = fit_image(image)
    assert fitted.size == fitted_size(*size) and max(fitted.size) == max(max(size), 1)
    batch = generation_batch(processor, [image])  # raised ValueError for 10 x 2100 before fit_image
    grid = batch["image_grid_thw"][0]
    merge = processor.image_processor.merge_size
    assert int(grid.prod()) // merge**2 == num_image_tokens(processor, *size)
    if size == (10, 2100):
        with pytest.raises(ValueError, match="aspect ratio"):
            processor.image_processor(images=[image], return_tensors="pt")


def test_augmented_lengths_are_the_worst_case(prepared: Path, processor) -> None:
    ds = OCRDataset(prepared / "train.jsonl", augment=True, max_samples=24)
    plain = sequence_lengths(ds, processor)
    worst = sequence_lengths(ds, processor, augment=True)
    assert all(w >= p for w, p in zip(worst, plain, strict=True))
    collator = OCRCollator(processor, max_length=None)
    random.seed(0)
    grew = 0
    for _ in range(4):  # augment pads up to 4 px a side: the length may grow past the plain count
        got = collator([ds[i] for i in range(len(ds))])["attention_mask"].sum(1).tolist()
        assert all(g <= w for g, w in zip(got, worst, strict=True))
        grew += sum(g > p for g, p in zip(got, plain, strict=True))
    assert grew > 0  # so the plain count (today's) would have let an augmented crop exceed max_length


def test_spread_sample_covers_every_book() -> None:
    records = [{"id": f"{b}/{i}", "book": b} for b, n in (("A", 50), ("B", 3), ("C", 40), ("D", 20))
               for i in range(n)]
    got = spread_sample(records, 20, seed=1)
    counts = Counter(r["book"] for r in got)
    assert len(got) == 20 and counts["B"] == 3 and sorted(counts.values()) == [3, 5, 6, 6]
    assert got == spread_sample(records, 20, seed=1) != spread_sample(records, 20, seed=2)
    assert [records.index(r) for r in got] == sorted(records.index(r) for r in got)  # file order
    assert Counter(r["book"] for r in spread_sample(records, 3, seed=0)).most_common(1)[0][1] == 1
    assert spread_sample(records, 500, seed=0) == records


def test_evaluate_num_samples_spreads_over_books(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    write_split(data, "test", read_jsonl(prepared / "train.jsonl"), prepared)  # 3 books in file order
    books = {r["book"] for r in read_jsonl(data / "test.jsonl")}
    assert len(books) == 3
    out = tmp_path / "o"
    rc = evaluate_model.main(["--model_path", str(tiny_model), "--data_dir", str(data), "--num_samples",
                              "6", "--output_dir", str(out), "--max_new_tokens", "4"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert Counter(r["book"] for r in rows) == dict.fromkeys(books, 2)  # not the first 6 crops of one book


def test_evaluate_max_length_filters_like_training(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                    processor) -> None:
    ds = OCRDataset(prepared / "test.jsonl")
    lengths = sequence_lengths(ds, processor)
    limit = sorted(lengths)[len(lengths) // 2]
    out = tmp_path / "o"
    rc = evaluate_model.main(["--model_path", str(tiny_model), "--data_dir", str(prepared), "--max_length",
                              str(limit), "--output_dir", str(out), "--max_new_tokens", "4"])
    assert rc == 0
    res = json.loads((out / "metrics.json").read_text())
    over = sum(n > limit for n in lengths)
    assert res["num_samples"] == len(lengths) - over and len(res["sample_lengths"]["dropped"]) == over > 0


def run_args(tiny_model: Path, data: Path, out: Path, *extra: str):
    return sft_arguments.parse_args([
        "--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out),
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--learning_rate", "3e-3", "--logging_steps", "1", *extra,
    ])


@pytest.fixture
def long_val(prepared: Path, tmp_path: Path, processor) -> tuple[Path, int, list[str]]:
    """train: 8 crops of one book; val: 3 books, with crops over the returned max_length (train has none)."""
    train = read_jsonl(prepared / "train.jsonl")
    first_book = [r for r in train if r["book"] == train[0]["book"]][:8]
    data = tmp_path / "d"
    write_split(data, "train", first_book, prepared)
    write_split(data, "val", [r for r in train if r not in first_book][:30], prepared)
    write_split(data, "test", read_jsonl(prepared / "test.jsonl"), prepared)
    limit = max(sequence_lengths(OCRDataset(data / "train.jsonl"), processor))
    val = OCRDataset(data / "val.jsonl")
    over = [r["id"] for r, n in zip(val.records, sequence_lengths(val, processor), strict=True) if n > limit]
    assert 0 < len(over) < len(val)
    return data, limit, over


def test_val_crop_over_max_length_is_dropped_and_counted(tiny_model: Path, long_val, tmp_path: Path,
                                                         caplog) -> None:
    data, limit, over = long_val
    out = tmp_path / "o"
    trainer = sft_build.build_trainer(*run_args(
        tiny_model, data, out, "--max_length", str(limit), "--max_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "1", "--eval_generation_samples", "6", "--generation_max_new_tokens", "4",
        "--save_strategy", "no"))
    trainer.train()  # today: OverlongError at the first evaluation (eval batch 1 holds only a long crop)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [d["id"] for d in summary["val"]["dropped"]] == over
    assert summary["train"]["dropped"] == [] and "test" in summary
    assert f"val: {len(over)} of 30 crops over max_length {limit:,} dropped" in caplog.text
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 1, 2] and "eval_cer" in evals[0]  # the base at step 0
    ids = json.loads((out / "eval_sample_ids.json").read_text())
    books = Counter(i.rsplit("/", 1)[0] if "/" in i else i for i in ids["generation"])
    val_books = {r["id"]: r["book"] for r in read_jsonl(data / "val.jsonl")}
    assert len({val_books[i] for i in ids["generation"]}) >= 2, books  # not the first 6 crops of one book
    assert not set(ids["loss"]) & set(over)


def test_no_base_evaluation_when_evaluation_is_off(tiny_model: Path, long_val, tmp_path: Path) -> None:
    data, _, _ = long_val
    trainer = sft_build.build_trainer(*run_args(tiny_model, data, tmp_path / "o", "--eval_strategy", "no",
                                          "--save_strategy", "no", "--max_steps", "1"))
    trainer.train()
    assert not [h for h in trainer.state.log_history if any(k.startswith("eval_") for k in h)]


def test_on_overlong_error_stops_before_loading(tiny_model: Path, long_val, tmp_path: Path,
                                                monkeypatch) -> None:
    data, limit, over = long_val

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the lengths were checked")

    monkeypatch.setattr(sft_build, "load_model_and_processor", must_not_load)
    with pytest.raises(sft.DatasetError, match=f"val: {len(over)} of 30 .*e.g. {over[0]}"):
        sft_build.build_trainer(*run_args(tiny_model, data, tmp_path / "o", "--max_length", str(limit),
                                    "--on_overlong", "error"))


def test_base_verdict_warns_when_fine_tuning_did_not_help() -> None:
    args = TrainingArguments(output_dir="/tmp/x", metric_for_best_model="cer", greater_is_better=False)

    class State:
        log_history = [{"step": 0, "eval_cer": 0.30}, {"step": 10, "eval_cer": 0.31}]
        best_metric = 0.31

    assert "not better than the base" in sft_build.base_verdict(State, args)
    State.best_metric = 0.2
    assert sft_build.base_verdict(State, args) is None


def test_sample_ids_survive_loader_workers(tiny_model: Path, prepared: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    write_split(data, "train", read_jsonl(prepared / "train.jsonl")[:8], prepared)
    got = []
    for workers in (0, 2):  # with workers the collator runs in other processes: its state never came back
        out = tmp_path / f"o{workers}"
        rc = sft.main(["--model_path", str(tiny_model), "--data_dir", str(data), "--output_dir", str(out),
                       "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--max_steps", "4",
                       "--per_device_train_batch_size", "2", "--save_strategy", "no", "--log_sample_ids",
                       "true", "--dataloader_num_workers", str(workers)])
        assert rc == 0
        got.append(json.loads((out / "sample_ids_rank0.json").read_text()))
    assert got[0] == got[1] and sorted(got[0]) == sorted(r["id"] for r in read_jsonl(data / "train.jsonl"))


def test_train_sh_on_the_extreme_fixture(release_model, extreme_data: Path, tmp_path: Path) -> None:
    """The release-like v1 model on data with the real extremes, loader workers, eval batch 1 and an
    evaluation at step 1: today's main died at its first evaluation (OverlongError on a long val crop)."""
    import subprocess

    from tests.launch import TRAIN_SH, train_env

    out = tmp_path / "o"
    env = train_env(release_model("v1"), extreme_data, out, NUM_WORKERS="2", MAX_LENGTH="600",
                    BATCH_SIZE="1", GRAD_ACCUM="1", EVAL_STEPS="1", SAVE_STEPS="2",
                    EVAL_GENERATION_SAMPLES="4", LR="1e-4")
    proc = subprocess.run([*TRAIN_SH, "--max_steps", "2", "--max_eval_samples", "6",
                           "--generation_max_new_tokens", "4", "--disable_tqdm", "true"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["val"]["dropped"] and summary["train"]["dropped"] and summary["test"]["dropped"]
    assert "val: 2 of 31 crops over max_length 600 dropped" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_cer" in h] == [0, 1, 2]
    ids = json.loads((out / "eval_sample_ids.json").read_text())
    val_books = {r["id"]: r["book"] for r in read_jsonl(extreme_data / "val.jsonl")}
    assert len({val_books[i] for i in ids["generation"]}) == 2 and len(ids["loss"]) == 6
    # evaluate_model.py --num_samples at the same max_length draws the very same CER sample
    ev = tmp_path / "ev"
    assert evaluate_model.main(["--model_path", str(release_model("v1")), "--data_dir", str(extreme_data),
                                "--split", "val", "--num_samples", "4", "--max_length", "600", "--output_dir",
                                str(ev), "--max_new_tokens", "2"]) == 0
    got = [json.loads(line)["id"] for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert sorted(got) == sorted(ids["generation"])
