"""The seed project's `from custom_collator import OCRCollator`, kept: the collator lives in
paddleocr_vl_manga.data.collator.

The design card names this file; code written against the seed project imports it from the root, so it stays
as an explicit re-export (nothing in the kit imports it)."""

from paddleocr_vl_manga.data.collator import OCRCollator, generation_batch, generation_prompt

__all__ = ["OCRCollator", "generation_batch", "generation_prompt"]
