"""The seed project's `from ocr_dataset import OCRDataset`, kept: the dataset lives in
paddleocr_vl_manga.data.dataset.

The design card names this file; code written against the seed project imports it from the root, so it stays
as an explicit re-export (nothing in the kit imports it)."""

from paddleocr_vl_manga.data.dataset import (
    DatasetError,
    OCRDataset,
    build_messages,
    load_image,
    mixed_train_dataset,
    read_jsonl,
)

__all__ = ["DatasetError", "OCRDataset", "build_messages", "load_image", "mixed_train_dataset", "read_jsonl"]
