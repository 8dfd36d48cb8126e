"""The collator's rope position ids and logit positions: equal to what the model computes itself, and the
model's logits and loss unchanged by them (tiny model and the release-like v1 / 1.5 fixtures)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paddleocr_vl_manga.data.collator import OCRCollator, logits_positions
from paddleocr_vl_manga.model.loading import load_model_and_processor

# (width, height): tall, wide, square and small crops, so every row has its own image grid and length
SIZES = [(40, 300), (300, 40), (120, 120), (64, 200)]
TEXTS = ["あ", "魔王様！行くぞ！", "ＯＫ", "「ドキドキ」…ー"]


@pytest.fixture(scope="module", params=["tiny", "v1", "v1.5"])
def loaded(request: pytest.FixtureRequest, tiny_model: Path, release_model: Callable[[str], Path]):
    path = tiny_model if request.param == "tiny" else release_model(request.param)
    model, processor = load_model_and_processor(str(path), dtype=torch.float32)
    return model, processor


def crops(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "text": t, "id": i}
            for i, ((w, h), t) in enumerate(zip(SIZES[:n], TEXTS[:n], strict=True))]


def model_inputs(batch: dict, *, rope: bool) -> dict:
    """What a plain model(**inputs) takes: no logit positions; the collator's rope ids only if `rope`."""
    return {k: v for k, v in batch.items() if k != "logits_to_keep" and (rope or k != "position_ids")}


def forward_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits, position ids the rotary embedding received, get_rope_index calls) of one forward."""
    seen, calls = [], []
    inner = model.model
    hook = inner.language_model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    real = inner.get_rope_index
    inner.get_rope_index = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    inner.rope_deltas = None
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
    finally:
        hook.remove()
        del inner.get_rope_index
    (positions,) = seen
    return out, positions, len(calls)


@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_rope_ids_are_the_models(loaded, multiple: int | None) -> None:
    model, processor = loaded
    batch = OCRCollator(processor, max_length=None, pad_to_multiple_of=multiple)(crops())
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 0).any() and len(set(mask.sum(1).tolist())) == 4  # right padding, mixed lengths
    assert len(set(map(tuple, batch["image_grid_thw"].tolist()))) == 4  # four image grids
    if multiple:
        assert mask.shape[1] % multiple == 0
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    assert batch["position_ids"].shape == want.shape == (3, *mask.shape)
    assert batch["position_ids"].dtype == want.dtype and torch.equal(batch["position_ids"], want)

    # The forward with the collator's ids: no rope computation of its own, the same positions reach the
    # rotary embedding, and the logits and loss are bit for bit those of the forward that computes them.
    out_model, pos_model, calls_model = forward_positions(model, model_inputs(batch, rope=False))
    out_ours, pos_ours, calls_ours = forward_positions(model, model_inputs(batch, rope=True))
    assert (calls_model, calls_ours) == (1, 0)
    assert torch.equal(pos_ours, pos_model) and torch.equal(pos_ours, want)
    assert torch.equal(out_ours.logits, out_model.logits)
    assert torch.equal(out_ours.loss, out_model.loss)


def test_logit_positions_give_the_models_loss(loaded) -> None:
    model, processor = loaded
    batch = OCRCollator(processor, max_length=None, pad_to_multiple_of=8)(crops())
    keep = batch["logits_to_keep"]
    labelled = (batch["labels"][:, 1:] != -100).nonzero()[:, 1].unique()  # sorted positions of any row
    assert keep.dtype == torch.long and keep.ndim == 1 and torch.equal(keep, labelled)
    with torch.no_grad():
        full = model(**model_inputs(batch, rope=True), use_cache=False)
        inputs = {k: v for k, v in model_inputs(batch, rope=True).items() if k != "labels"}
        part = model(**inputs, logits_to_keep=keep, use_cache=False)
    torch.testing.assert_close(part.logits, full.logits[:, keep], rtol=0, atol=0)


def test_dropped_row_keeps_rope_ids_and_logit_positions_consistent(loaded) -> None:
    model, processor = loaded
    exs = crops()
    full = OCRCollator(processor, max_length=None)(exs)
    lengths = full["attention_mask"].sum(1)
    longest = int(lengths.argmax())
    limit = int(lengths.sort().values[-2])  # every row but the longest fits
    collator = OCRCollator(processor, max_length=limit, pad_to_multiple_of=8)
    batch = collator(exs)
    keep = [i for i in range(len(exs)) if i != longest]
    assert collator.num_dropped == 1 and len(batch["input_ids"]) == 3
    width = batch["input_ids"].shape[1]
    assert width == -(-limit // 8) * 8  # re-trimmed to the rows left
    want, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    assert torch.equal(batch["position_ids"], want)
    # each kept row's positions are those it had in the full batch (padding: 0)
    rows = full["position_ids"][:, keep, : min(width, full["input_ids"].shape[1])]
    assert torch.equal(batch["position_ids"][:, :, : rows.shape[2]], rows)
    assert torch.equal(batch["logits_to_keep"], logits_positions(batch["labels"]))
    assert not torch.equal(batch["logits_to_keep"], full["logits_to_keep"])  # the longest answer went
    _, _, calls = forward_positions(model, model_inputs(batch, rope=True))
    assert calls == 0


def test_rope_in_collator_off_leaves_it_to_the_model(loaded) -> None:
    _, processor = loaded
    batch = OCRCollator(processor, max_length=None, rope_in_collator=False)(crops(2))
    assert "position_ids" not in batch and "logits_to_keep" in batch
