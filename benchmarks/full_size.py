"""The full-size (0.9B) PaddleOCR-VL with random weights, for benchmarks on a GPU: nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration

from paddleocr_vl_manga.model.loading import ensure_release_prompt
from tools.make_tiny_model import (
    IMAGE_END,
    IMAGE_START,
    IMAGE_TOKEN,
    RELEASE_SPECIAL_IDS,
    VIDEO_TOKEN,
    release_processor,
)


def build_full_size_random(
    *, dtype: torch.dtype, device: torch.device | str, attn_implementation: str = "sdpa", version: str = "v1"
) -> tuple[Any, Any]:
    """`PaddleOCRVLConfig()` defaults (untied lm_head), random weights, driven by the release-like processor.

    The processor is tools/make_tiny_model.release_processor: the release's token ids and tokenizer behaviour,
    its chat template (v1's dropped image markers corrected as the loader does) and its image bounds
    (min_pixels 147384, so every small crop becomes ~150-190 image tokens): realistic sequence shapes.
    """
    processor = release_processor(version)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = PaddleOCRVLConfig(
        text_config={"tie_word_embeddings": False, **ids},  # else its default True is forwarded outwards
        tie_word_embeddings=False,
        image_token_id=RELEASE_SPECIAL_IDS[IMAGE_TOKEN],
        video_token_id=RELEASE_SPECIAL_IDS[VIDEO_TOKEN],
        vision_start_token_id=RELEASE_SPECIAL_IDS[IMAGE_START],
        vision_end_token_id=RELEASE_SPECIAL_IDS[IMAGE_END],
        **ids,
    )
    assert config.text_config.vocab_size == 103424 > len(processor.tokenizer)
    ensure_release_prompt(config, processor, lambda: f"the release-like {version} chat template")
    with torch.device(device):  # init on the GPU directly: a 0.9B init on CPU takes ~20 s
        model = PaddleOCRVLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model, processor
