"""A reading's confidence: the probability the model gave its own greedy tokens (issue 29)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from paddleocr_vl_manga.data.collator import generation_batch
from paddleocr_vl_manga.model.generation import confidence_of, generate_readings
from paddleocr_vl_manga.model.loading import load_model_and_processor


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    return load_model_and_processor(str(tiny_model))


def _crops() -> list[Image.Image]:
    crops = []
    for k, size in enumerate([(40, 120), (64, 200), (30, 30)]):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).rectangle([2, 2 + 3 * k, size[0] - 3, size[1] // 2], fill="black")
        crops.append(im)
    return crops


def test_confidence_is_the_geometric_mean_of_the_greedy_token_probabilities(loaded) -> None:
    """Checked against a separate teacher-forced forward pass over prompt + answer: the probabilities the
    model gives each token it chose, and its end token when it stopped by itself."""
    model, processor = loaded
    crops = _crops()
    readings = generate_readings(model, processor, crops, batch_size=3, max_new_tokens=12)
    eos = processor.tokenizer.eos_token_id
    for crop, reading in zip(crops, readings, strict=True):
        batch = generation_batch(processor, [crop])
        out = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True,
                             pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=eos)
        answer = out[0, batch["input_ids"].shape[1]:].tolist()
        kept = answer[: answer.index(eos) + 1] if eos in answer else answer
        assert reading.stop == ("eos" if eos in answer else "cap")
        ids = torch.tensor([batch["input_ids"][0].tolist() + kept])
        extra = {k: torch.cat([batch[k], torch.zeros(1, len(kept), dtype=batch[k].dtype)], 1)
                 for k in ("mm_token_type_ids",) if k in batch}  # the answer is text
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                           **extra).logits[0].float()
        n = batch["input_ids"].shape[1]
        log_probs = torch.log_softmax(logits[n - 1 : n - 1 + len(kept)], -1)
        chosen = log_probs.gather(1, torch.tensor(kept)[:, None])[:, 0]
        assert reading.confidence == pytest.approx(math.exp(chosen.mean().item()), rel=1e-3)
        assert reading.min_probability == pytest.approx(math.exp(chosen.min().item()), rel=1e-3)
        assert 0.0 <= reading.min_probability <= reading.confidence <= 1.0


def test_a_sure_model_reads_near_one_and_an_unsure_one_near_chance(loaded) -> None:
    model, processor = loaded
    token = processor.tokenizer.convert_tokens_to_ids("あ")
    vocab = model.lm_head.out_features
    readings = {}
    for name, margin in (("sure", 30.0), ("unsure", 1e-5)):
        m = copy.deepcopy(model)
        head = torch.nn.Linear(m.lm_head.in_features, vocab, bias=True)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[token] = margin  # "unsure": every token about as likely
        m.lm_head = head
        readings[name] = generate_readings(m, processor, _crops()[:1], max_new_tokens=5)[0]
    assert readings["sure"].confidence > 0.999 and readings["sure"].stop in ("loop", "cap")
    assert readings["unsure"].confidence == pytest.approx(1 / vocab, rel=1e-3)


def test_confidence_of_an_empty_generation_is_zero() -> None:
    assert confidence_of([]) == (0.0, 0.0)
    assert confidence_of([math.log(0.5), math.log(0.125)]) == pytest.approx((0.25, 0.125))
