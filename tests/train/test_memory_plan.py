"""memory_plan.py: the exact parts against a real training step of each mode, the activation estimate against
what autograd saves (tiny model, CPU), and format_plan's verdict."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import paddleocr_vl_manga.train.arguments as sft_arguments
import paddleocr_vl_manga.train.build as sft_build
import paddleocr_vl_manga.train.run as sft
import paddleocr_vl_manga.train.trainer as sft_trainer
from paddleocr_vl_manga.data.collator import OCRCollator
from paddleocr_vl_manga.model.loading import load_config_and_processor, load_model_and_processor
from paddleocr_vl_manga.model.lora import add_lora
from paddleocr_vl_manga.train.memory_plan import GIB, GpuMemory, format_plan, gpu_memory_bytes, memory_plan
from tools.make_synthetic_manga109 import CHARSET

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_memory_plan import saved_tensor_bytes, set_checkpointing  # noqa: E402

R = 4
# (mode of the plan row, dtype of the loaded weights, LoRA targets): LoRA on both bases, its gradient starting
# in each part
MODES = [("fp32_master", torch.float32, ""), ("bf16_lean", torch.bfloat16, ""),
         ("lora", torch.bfloat16, "language"), ("lora", torch.float32, "language,projector"),
         ("lora", torch.bfloat16, "vision")]


def batch_of(processor, crops: list[tuple[int, int]]) -> dict:
    rng = random.Random(0)
    examples = [{"image": Image.new("RGB", crop, "white"), "text": "".join(rng.choices(CHARSET, k=5 + 3 * i))}
                for i, crop in enumerate(crops)]
    return OCRCollator(processor)(examples)


def plan_for(tiny_model: Path, batch: dict, mode: str, dtype: torch.dtype, targets: str, gc: bool = False,
             autocast: bool = True, **kw):
    config = load_config_and_processor(str(tiny_model)).config  # as sft has it before loading weights
    rows = memory_plan(
        config, batch_size=len(batch["input_ids"]), seq_len=batch["input_ids"].shape[1],
        image_tokens=int(batch["image_grid_thw"].prod(-1).max()) // 4, gradient_checkpointing=gc,
        bf16_autocast=autocast, lora_r=R, lora_targets=targets or "language",
        lora_precision="fp32_master" if dtype == torch.float32 else "bf16_lean", **kw,
    )
    assert [r.mode for r in rows] == ["fp32_master", "bf16_lean", "lora"]
    return next(r for r in rows if r.mode == mode)


def model_for(tiny_model: Path, mode: str, dtype: torch.dtype, targets: str, gc: bool = False):
    model, processor = load_model_and_processor(str(tiny_model), dtype=dtype)
    model.config.use_cache = False
    set_checkpointing(model, gc)
    if mode == "lora":
        model = add_lora(model, R, targets)
    return model.train(), processor


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("mode", "dtype", "targets"), MODES)
def test_weights_gradients_optimizer_are_exact(tiny_model: Path, mode: str, dtype: torch.dtype,
                                               targets: str) -> None:
    model, processor = model_for(tiny_model, mode, dtype, targets)
    trained = [p for p in model.parameters() if p.requires_grad]
    if mode == "bf16_lean":
        cls, kwargs = sft_trainer.lean_optimizer(1e-4)
        optimizer = cls(trained, **kwargs)
    else:  # Trainer's default: torch AdamW (fp32_master, and the fp32 adapters of LoRA)
        optimizer = torch.optim.AdamW(trained, lr=1e-4)
    batch = batch_of(processor, [(40, 120), (120, 60)])
    sft_trainer.answer_loss(model, batch)[0].backward()
    optimizer.step()

    plan = plan_for(tiny_model, batch, mode, dtype, targets)
    assert plan.weights == nbytes(model.parameters())
    assert plan.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    # the moments (and optimi's Kahan compensation); the 0-d `step` counters are left out by design
    state = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t) and t.dim()]
    assert plan.optimizer == nbytes(state)
    parts = (plan.weights, plan.gradients, plan.optimizer, plan.autocast_copies, plan.activations)
    assert plan.total == sum(parts)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize(("mode", "dtype", "targets"), MODES)
def test_activation_estimate_matches_saved_tensors(tiny_model: Path, mode: str, dtype: torch.dtype,
                                                   targets: str, gc: bool, autocast: bool) -> None:
    """What autograd keeps for backward after one forward (under bf16 autocast with CUDA's layer_norm/dropout
    dtypes, or without autocast; benchmarks/bench_memory_plan.py) against the plan's saved parts, and the
    bf16 weight copies it keeps."""
    model, processor = model_for(tiny_model, mode, dtype, targets, gc)
    batch = batch_of(processor, [(40, 160), (40, 160)])
    keep = int((batch["labels"][:, 1:] != -100).any(0).sum())
    plan = plan_for(tiny_model, batch, mode, dtype, targets, gc, autocast, logit_positions=keep)
    got = saved_tensor_bytes(model, batch, autocast)
    for part in ("vision", "projector", "decoder", "logits"):
        assert got[part] == pytest.approx(plan.activation_parts[part], rel=0.02, abs=1024), part
    saved = sum(plan.activation_parts[p] for p in got if p != "weight_copies")
    assert plan.activations == saved + plan.activation_parts["transient"] > saved
    if not autocast:
        assert got["weight_copies"] == plan.autocast_copies == 0
    elif dtype == torch.float32:  # the casts autograd keeps are in the plan (autocast's cache also holds the
        # biases' and, under checkpointing, every weight's; the plan adds a recomputed layer's)
        assert got["weight_copies"] <= plan.autocast_copies <= 2 * got["weight_copies"] + 200_000
    else:  # only fp32 tensors get a bf16 copy: LoRA's adapters, cached by autocast for the whole step
        fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
        assert plan.autocast_copies == 2 * fp32


def test_logits_default_plans_for_scattered_answers(tiny_model: Path) -> None:
    """Without logit_positions: the longest sample's text tokens per row, times B (no two rows' answers at
    the same positions), at most the sequence."""
    config = load_config_and_processor(str(tiny_model)).config

    def logits(batch_size: int, seq_len: int, image_tokens: int, positions: int | None = None) -> int:
        rows = memory_plan(config, batch_size=batch_size, seq_len=seq_len, image_tokens=image_tokens,
                           gradient_checkpointing=True, bf16_autocast=True, lora_r=0, lora_targets="language",
                           lora_precision="bf16_lean", logit_positions=positions)
        return rows[1].activation_parts["logits"]

    assert logits(1, 60, 40) == logits(1, 60, 40, 20) < logits(2, 60, 40) == logits(2, 60, 40, 40)
    assert logits(2, 60, 20) == logits(2, 60, 20, 60) < logits(2, 60, 20, 61)


def test_format_plan_warns_only_when_the_chosen_mode_does_not_fit(tiny_model: Path) -> None:
    config = load_config_and_processor(str(tiny_model)).config
    rows = memory_plan(config, batch_size=4, seq_len=80, image_tokens=40, gradient_checkpointing=False,
                       bf16_autocast=True, lora_r=0, lora_targets="language", lora_precision="bf16_lean")
    lean, lora = rows[1], rows[2]
    assert lora.label == "LoRA r16 on language, bf16 base" and lora.total < lean.total < rows[0].total

    # free memory decides, not the total: a desktop card's display holds part of it
    text = format_plan(rows, "bf16_lean", GpuMemory(free=lean.total - 1, total=2 * lean.total))
    lines = text.splitlines()
    assert lines[0].startswith("memory plan") and "batch 4 x 80 tokens" in text
    chosen = [line for line in lines if line.startswith(">")]
    assert len(chosen) == 1 and "bf16_lean" in chosen[0]
    assert chosen[0].split()[-1] == f"{lean.total / GIB:.2f}"
    warning = lines[-1]
    assert warning.startswith("warning: bf16_lean") and "exceeds the visible GPU's free memory" in warning
    assert f"{(lean.total - 1) / GIB:.1f} of {2 * lean.total / GIB:.1f} GiB" in warning  # free of total
    assert "lora" in warning and "fp32_master" not in warning  # what fits is suggested, what doesn't is not
    assert "smaller --per_device_train_batch_size" in warning and "--gradient_checkpointing true" in warning

    for fits in (format_plan(rows, "bf16_lean", GpuMemory(lean.total, lean.total)),
                 format_plan(rows, "lora", GpuMemory(lora.total + 1, 2 * lean.total))):
        assert "warning" not in fits and "fits the visible GPU's free memory" in fits.splitlines()[-1]
    assert "no CUDA device" in format_plan(rows, "bf16_lean", None).splitlines()[-1]


def test_full_size_plan_needs_no_weights() -> None:
    """The 0.9B config is planned on the meta device; its exact parts give the README's figures."""
    from transformers import PaddleOCRVLConfig

    config = PaddleOCRVLConfig(text_config={"tie_word_embeddings": False}, tie_word_embeddings=False)
    rows = memory_plan(config, batch_size=1, seq_len=230, image_tokens=188, gradient_checkpointing=True,
                       bf16_autocast=True, lora_r=16, lora_targets="language", lora_precision="bf16_lean")
    fp32, lean, lora = ((r.weights + r.gradients + r.optimizer) / 1e9 for r in rows)
    assert fp32 == pytest.approx(14.5, abs=0.05) and lean == pytest.approx(9.05, abs=0.05)  # README
    assert lora < 2.0  # a frozen bf16 base (1.8 GB) and a few M adapter numbers


def test_gpu_memory_bytes_is_the_visible_devices_free_memory_or_none(monkeypatch) -> None:
    size = gpu_memory_bytes()
    assert (size is None) == (not torch.cuda.is_available())
    assert size is None or 0 < size.free <= size.total and size.total > 2**30
    # a 12 GiB desktop card whose display holds 1.5 GiB: free, not total (what mem_get_info says)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(10.5 * GIB), 12 * GIB))
    assert gpu_memory_bytes() == GpuMemory(free=int(10.5 * GIB), total=12 * GIB)


def test_benchmark_cli_prints_measured_against_plan(capsys: pytest.CaptureFixture[str]) -> None:
    import bench_memory_plan

    assert bench_memory_plan.main(["--config", "tiny", "--mode", "bf16_lean", "lora", "--batch_size", "2",
                                   "--crop", "40x120", "--gc", "0", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith(("bf16_lean ", "lora "))]
    assert len(rows) == 4 and all("(1.00)" in row for row in rows)
    assert float(out[-1].split()[-1].rstrip("%")) < 1


def test_sft_prints_the_plan_without_loading_weights(tiny_model: Path, prepared: Path, tmp_path: Path,
                                                     monkeypatch, capsys, caplog) -> None:
    """--print_memory_plan: the plan for the longest train crop, and no weights read; a run logs it at start
    and warns when the chosen mode does not fit the visible GPU."""
    import paddleocr_vl_manga.train.memory_plan as mp

    argv = ["--model_path", str(tiny_model), "--data_dir", str(prepared), "--output_dir", str(tmp_path / "o"),
            "--report_to", "none", "--per_device_train_batch_size", "4", "--lora_r", "8"]

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    with monkeypatch.context() as m:
        m.setattr(sft_build, "load_model_and_processor", no_weights)
        assert sft.main([*argv, "--print_memory_plan", "true"]) == 0
    out = capsys.readouterr().out
    assert "> lora (LoRA r8 on language" in out and "for batch 4 x " in out
    assert not (tmp_path / "o").exists()

    monkeypatch.setattr(mp, "gpu_memory_bytes", lambda: GpuMemory(1024, 80 * GIB))  # 1 KiB free of 80 GiB
    with caplog.at_level("WARNING", logger="sft"):
        sft_build.build_trainer(*sft_arguments.parse_args([*argv, "--max_steps", "1"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("exceeds the visible GPU's free memory, 0.0 of 80.0 GiB" in w for w in warnings), warnings


def test_docs_memory_table_is_what_the_plan_says() -> None:
    """The docs' table is written by `python tools/write_docs.py`; a changed formula must rewrite it."""
    import re

    from paddleocr_vl_manga.train.memory_plan import README_MARKERS, readme_table

    text = (Path(__file__).resolve().parents[2] / "docs" / "lora-and-memory.md").read_text(encoding="utf-8")
    found = re.search(re.escape(README_MARKERS[0]) + ".*?" + re.escape(README_MARKERS[1]), text, flags=re.S)
    assert found and found.group(0) == readme_table()
