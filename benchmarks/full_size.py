"""The full-size (0.9B) PaddleOCR-VL with random weights, for benchmarks on a GPU: nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor, PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration

from custom_collator import configure_image_size
from tools.make_tiny_model import IMAGE_END, IMAGE_START, VIDEO_TOKEN

# The released processor's image bounds: every small crop is upscaled to >= 147,384 px (~188 image tokens).
RELEASE_MIN_PIXELS, RELEASE_MAX_PIXELS = 147384, 2822400


def build_full_size_random(
    tiny_dir: str, *, dtype: torch.dtype, device: torch.device | str, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """`PaddleOCRVLConfig()` defaults (untied lm_head), random weights, the tiny model's tokenizer ids.

    The tiny character tokenizer's ids are valid rows of the 103k-token embedding, so its processor (with the
    release's image bounds) drives the full-size architecture with realistic sequence shapes.
    """
    processor = AutoProcessor.from_pretrained(tiny_dir)
    configure_image_size(processor, RELEASE_MIN_PIXELS, RELEASE_MAX_PIXELS)
    tok = processor.tokenizer
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    config = PaddleOCRVLConfig(
        text_config={"tie_word_embeddings": False, **ids},  # else its default True is forwarded outwards
        tie_word_embeddings=False,
        image_token_id=tok.image_token_id,
        video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_start_token_id=tok.convert_tokens_to_ids(IMAGE_START),
        vision_end_token_id=tok.convert_tokens_to_ids(IMAGE_END),
        **ids,
    )
    assert config.text_config.vocab_size > len(tok)
    with torch.device(device):  # init on the GPU directly: a 0.9B init on CPU takes ~20 s
        model = PaddleOCRVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model, processor
