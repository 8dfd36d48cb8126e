"""benchmarks/bench_train.py: the CPU smoke run, and that our loss is the plain loss (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import paddleocr_vl_manga.data.manga109 as prep
from paddleocr_vl_manga.data.collator import OCRCollator
from paddleocr_vl_manga.data.dataset import OCRDataset
from paddleocr_vl_manga.model.loading import load_model_and_processor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402


def test_smoke_prints_both_recipes_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config", "tiny",
           "--recipe", "seed", "default", "default:rope=0", "--steps", "2", "--warmup", "1", "--books", "2",
           "--pages", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("recipe ", 1)[1].splitlines()
    seed = next(line for line in table if line.startswith("seed "))
    default = next(line for line in table if line.startswith("default "))
    assert seed.split()[-2:] == ["1.00x", "ok"]
    assert default.split()[-1] == "ok" and default.split()[-2].endswith("x")
    rope = next(line for line in proc.stdout.splitlines() if line.startswith("rope ids: "))
    assert rope.startswith("rope ids: default (collator) ") and " vs default:rope=0 (model) " in rope
    assert rope.endswith("x")  # both figures and their ratio
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert rows["seed"]["bxa"] == "1x16" and rows["default"]["bxa"] == "8x2"
    assert not rows["seed"]["settings"]["rope"] and not rows["default:rope=0"]["settings"]["rope"]
    assert rows["default"]["settings"]["rope"]
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["peak_gib"] is None and r["mfu"] is None  # CPU: no GPU figures
        assert r["image_tokens_per_sample"] > 0


def test_recipe_options_parse() -> None:
    r = bench_train.parse_recipe("default:bs=4,ga=4,gc=0,group=1")
    assert (r.bs, r.ga, r.gc, r.group, r.precision, r.loss) == (4, 4, False, True, "bf16_lean", "answer")
    assert r.rope and not bench_train.parse_recipe("default:rope=0").rope
    assert not bench_train.parse_recipe("default").group  # as training: shuffled unless --group_by_length
    seed = bench_train.parse_recipe("seed")
    assert (seed.bs, seed.ga, seed.loss, seed.precision, seed.workers) == (1, 16, "model", "seed_bf16", 0)


def _off_by_one_loss(model, inputs: dict, num_items):
    """answer_loss with the classic bug: logits taken at the labelled positions instead of one before."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("logits_to_keep")  # the collator's (correct) positions
    keep = (labels != -100).any(0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels[:, keep].flatten(), reduction="sum")
    return loss / num_items, None


def test_default_loss_equals_plain_loss(synthetic_release: Path, tiny_model: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """answer_loss in bf16 on a padded batch of 8 == fp32 model(**batch).loss, same weights."""
    data = tmp_path / "data"
    prep.run(prep.PrepareArguments(manga109_root=str(synthetic_release), output_dir=str(data), num_workers=1,
                                   split_mode="random", test_fraction=0.0, val_fraction=0.0))
    model, processor = load_model_and_processor(str(tiny_model), dtype=torch.bfloat16)
    # Random init gives near-uniform logits, where every target costs about log(vocab) and a misaligned
    # target goes unnoticed; a peaked lm_head makes the loss depend on which token is the target.
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
    ds = OCRDataset(data / "train.jsonl")
    batch = OCRCollator(processor)([ds[i] for i in range(8)])
    assert (batch["attention_mask"] == 0).any()  # padding is part of what is checked
    before = [p.detach().clone() for p in model.parameters()]
    for name in ("default", "seed"):
        check = bench_train.check_loss(model.train(), batch, bench_train.parse_recipe(name))
        assert check["ok"], (name, check)
        assert abs(check["recipe_loss"] - check["fp32_loss"]) < 2e-3 * check["fp32_loss"]
    # The fp32 reference borrowed the parameters: they are back, bit for bit and in bf16.
    for p, b in zip(model.parameters(), before, strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p, b)
    assert model.training
    # And the check has teeth: a shifted target fails it.
    monkeypatch.setattr(bench_train.sft_trainer, "answer_loss", _off_by_one_loss)
    assert not bench_train.check_loss(model, batch, bench_train.parse_recipe("default"))["ok"]


def test_oom_is_a_row_not_a_crash(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = bench_train.run_recipe

    def run_or_oom(recipe, *args):
        if recipe.name == "default":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(recipe, *args)

    monkeypatch.setattr(bench_train, "run_recipe", run_or_oom)
    threads = torch.get_num_threads()
    try:
        rc = bench_train.main(["--config", "tiny", "--recipe", "seed", "default", "--steps", "1",
                               "--warmup", "0", "--books", "1", "--pages", "2", "--memory_cap_gb", "12"])
    finally:
        torch.set_num_threads(threads)  # main() pins CPU runs to one thread
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert next(line for line in lines if line.startswith("default ")).endswith("OOM at cap")
    assert next(line for line in lines if line.startswith("seed ")).endswith("1.00x  ok")
