"""ocr_quantize.quantize_model: int8 linear layers on the CPU, same texts as fp32 on a trained tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from paddleocr_vl_manga.data.collator import OCRCollator
from paddleocr_vl_manga.data.dataset import OCRDataset
from paddleocr_vl_manga.model.generation import generate_texts
from paddleocr_vl_manga.model.loading import load_model_and_processor
from paddleocr_vl_manga.model.quantize import METHODS, QuantizeError, quantize_model, quantized_linear_names


def is_int8_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear

    return isinstance(module, Linear) and module.weight().dtype == torch.qint8


@pytest.fixture(scope="module")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list[str]]:
    """A tiny model overfitted on 16 training crops (the demo's wider init learns in ~60 steps), saved; with
    the crops and their fp32 texts."""
    from tools.make_synthetic_manga109 import CHARSET
    from tools.make_tiny_model import build_tiny_model

    torch.manual_seed(0)
    folder = build_tiny_model(tmp_path_factory.mktemp("quant_tiny"), charset=CHARSET, init_std=0.1,
                              vision_init_std=0.2)
    model, processor = load_model_and_processor(folder)
    ds = OCRDataset(prepared / "train.jsonl", max_samples=16)
    examples = [ds[i] for i in range(len(ds))]
    batch = OCRCollator(processor)(examples)
    for key in ("logits_to_keep", "sample_index"):  # for answer_loss and the trainer, not model()
        batch.pop(key, None)
    steps = 60
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.05)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model.save_pretrained(folder)
    images = [e["image"] for e in examples]
    texts = generate_texts(model.eval(), processor, images, max_new_tokens=24)
    exact = sum(t == e["text"] for t, e in zip(texts, examples, strict=True))
    assert exact >= 12, "the tiny model did not learn its crops: the int8 comparison would mean little"
    return Path(folder), images, texts


@pytest.mark.parametrize("method", METHODS)
def test_int8_linears_and_same_texts(trained: tuple[Path, list, list[str]], method: str) -> None:
    folder, images, fp32_texts = trained
    model, processor = load_model_and_processor(folder)
    names = quantized_linear_names(model, method)
    vision = [n for n in names if n.startswith(("model.visual.", "model.projector."))]
    assert "lm_head" in names and any(".language_model.layers." in n for n in names)
    assert bool(vision) == (method == "int8")
    assert quantize_model(model, method) is model and not model.training
    modules = dict(model.named_modules())
    assert all(is_int8_linear(modules[n]) for n in names)
    # What is left in fp32 is what the method keeps: the vision side for int8-text, nothing for int8.
    left = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(n.startswith(("model.visual.", "model.projector.")) for n in left)
    assert bool(left) == (method == "int8-text")

    texts = generate_texts(model, processor, images, batch_size=4, max_new_tokens=24)
    assert len(texts) == len(images) and all(isinstance(t, str) for t in texts)
    # Measured 16/16 identical for both methods after 60 and 150 steps; int8 rounding may still flip a
    # near-tie, so allow two.
    same = sum(a == b for a, b in zip(texts, fp32_texts, strict=True))
    assert same >= len(images) - 2, list(zip(fp32_texts, texts, strict=True))
    assert generate_texts(model, processor, images[:2], batch_size=1, max_new_tokens=24) == texts[:2]
    if method == "int8-text":  # int8 afterwards adds the vision side (benchmarks/compare_quantized.py)
        quantize_model(model, "int8")
        assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_errors(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model_and_processor(tiny_model)
    with pytest.raises(QuantizeError, match=r"unknown quantization method 'int4'; choose one of int8"):
        quantize_model(model, "int4")
    with pytest.raises(QuantizeError, match=r"needs a float32 model, got torch\.bfloat16"):
        quantize_model(model.to(torch.bfloat16))
    with pytest.raises(QuantizeError, match="is a CPU path, but the model is on meta"):
        quantize_model(model.to("meta"))  # stands in for cuda, which CI has not
    model, _ = load_model_and_processor(tiny_model)
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # as in a torch that removed it
    with pytest.raises(ImportError, match=r"pip install 'torch"):
        quantize_model(model)
    assert not any(is_int8_linear(m) for m in model.modules())  # nothing half-done


def test_every_entry_point_takes_quantize(trained: tuple[Path, list, list[str]], tmp_path: Path,
                                          data_dir: Path) -> None:
    """MangaOcr(quantize=), MangaOcr.from_model(quantize=), predict/evaluate --quantize: one loader."""
    import json

    import paddleocr_vl_manga.evaluate.evaluation as evaluate_model
    import paddleocr_vl_manga.infer.predict as predict
    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

    folder, images, _ = trained
    mocr = MangaOcr(folder, quantize="int8", raw=True, max_new_tokens=24)
    assert is_int8_linear(mocr.model.lm_head)
    model, processor = load_model_and_processor(folder)
    wrapped = MangaOcr.from_model(model, processor, quantize="int8", raw=True, max_new_tokens=24)
    assert is_int8_linear(model.lm_head) and wrapped.batch(images[:4]) == mocr.batch(images[:4])
    crop = tmp_path / "c.png"
    images[0].save(crop)
    out = tmp_path / "p.jsonl"
    assert predict.main(["--model_path", str(folder), str(crop), "--quantize", "int8", "--max_new_tokens",
                         "24", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["text"] == mocr(images[0])
    ev = tmp_path / "ev"
    assert evaluate_model.main(["--model_path", str(folder), "--data_dir", str(data_dir), "--num_samples",
                                "3", "--quantize", "int8-text", "--output_dir", str(ev),
                                "--max_new_tokens", "4"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["dtype"] == "int8 (int8-text)"
