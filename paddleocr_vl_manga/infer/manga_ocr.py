"""A drop-in for manga-ocr's `MangaOcr`, backed by a (fine-tuned) PaddleOCR-VL checkpoint.

Tools written for manga-ocr (mokuro, owocr, ...) do

    from manga_ocr import MangaOcr
    mocr = MangaOcr(pretrained_model_name_or_path, force_cpu=False)
    text = mocr(img_or_path)

The same three lines work with this class; `compat/manga_ocr/` is a one-file package that re-exports it under
manga-ocr's name, so putting that folder (and this repo) on PYTHONPATH swaps the model, the tool unchanged.
Texts follow manga-ocr's output convention (`post_process`) unless `raw=True`; `batch()` reads many crops
through model.generation.generate_texts (batched, KV cache), which is much faster per crop than one call each.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from paddleocr_vl_manga.evaluate.metrics import manga_ocr_post_process as post_process
from paddleocr_vl_manga.model.generation import Reading

__all__ = ["MangaOcr", "Reading", "post_process"]

DEFAULT_MODEL = "PaddlePaddle/PaddleOCR-VL"
# What tools pass when the user changed nothing, and manga-ocr's own default argument, so `MangaOcr()` means
# it too. That checkpoint is manga-ocr's VisionEncoderDecoder, which this class cannot run, so it means "the
# default model": $MANGA_OCR_COMPAT_MODEL, else DEFAULT_MODEL.
MANGA_OCR_DEFAULT = "kha-white/manga-ocr-base"
ImageInput = str | Path | Image.Image


def _check_type(img_or_path: Any) -> None:
    if not isinstance(img_or_path, str | Path | Image.Image):
        raise ValueError(f"img_or_path must be a path or PIL.Image, instead got: {img_or_path!r}")


def _open(img_or_path: ImageInput) -> Image.Image:
    # manga-ocr also converts to grayscale ("L" then RGB); we keep colour, as our model was trained on it.
    from paddleocr_vl_manga.data.dataset import (  # 16-bit, alpha, ...: as training and evaluation read them
        open_rgb,
        rgb_image,
    )

    if isinstance(img_or_path, str | Path):
        return open_rgb(img_or_path)
    if isinstance(img_or_path, Image.Image):
        return rgb_image(img_or_path)
    raise ValueError(f"img_or_path must be a path or PIL.Image, instead got: {img_or_path!r}")


class MangaOcr:
    """manga-ocr's interface over PaddleOCR-VL: `MangaOcr(path)(image) -> text`."""

    def __init__(
        self,
        pretrained_model_name_or_path: str | Path = MANGA_OCR_DEFAULT,
        force_cpu: bool = False,
        *,
        raw: bool = False,
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        quantize: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        full_vocabulary: bool = False,
        vision_runtime: str | None = None,
    ) -> None:
        from paddleocr_vl_manga.model.loading import load_for_inference

        path = str(pretrained_model_name_or_path)
        if path == MANGA_OCR_DEFAULT:
            path = os.environ.get("MANGA_OCR_COMPAT_MODEL", DEFAULT_MODEL)
        # manga-ocr's device choice: CUDA, then Apple MPS, then CPU; bf16 only on CUDA (as evaluate_model).
        # quantize="int8": int8 linear layers on the CPU (model/quantize.py), for readers without a GPU.
        # full_vocabulary: lm_head over all tokens even where the folder has an output_vocabulary.json
        # vision_runtime="openvino" / "onnxruntime": the vision tower on that CPU runtime (vision_runtime.py)
        model, processor, self.device = load_for_inference(path, quantize=quantize, force_cpu=force_cpu,
                                                           allow_mps=True, full_vocabulary=full_vocabulary,
                                                           vision_runtime=vision_runtime)
        self.model_path, self.quantize = path, quantize
        self._setup(model, processor, raw=raw, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    min_pixels=min_pixels, max_pixels=max_pixels)

    @classmethod
    def from_model(
        cls, model: Any, processor: Any, *, quantize: str | None = None, **kwargs: Any
    ) -> MangaOcr:
        """Wrap an already loaded model and processor (benchmarks, notebooks) without reloading; with
        `quantize`, its linear layers become int8 in place (it must be an fp32 model on the CPU)."""
        if quantize is not None:
            from paddleocr_vl_manga.model.quantize import quantize_model

            model = quantize_model(model, quantize)
        self = cls.__new__(cls)
        self.device = str(next(model.parameters()).device)
        self.model_path, self.quantize = getattr(model, "name_or_path", ""), quantize
        self._setup(model, processor, **kwargs)
        return self

    def _setup(self, model: Any, processor: Any, *, raw: bool = False, batch_size: int = 16,
               max_new_tokens: int | None = None, min_pixels: int | None = None,
               max_pixels: int | None = None) -> None:
        from paddleocr_vl_manga.data.collator import configure_image_size
        from paddleocr_vl_manga.model.generation import generation_flag_error, pixel_bounds_error

        # max_new_tokens None: each crop's cap follows its size (model.generation.auto_max_new_tokens), and a
        # looping answer is stopped either way, so a tool calling once per line always gets an answer soon.
        if batch_size <= 0 or (max_new_tokens is not None and max_new_tokens <= 0):
            raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size}, "
                             f"{max_new_tokens}")
        problem = generation_flag_error(max_new_tokens, min_pixels, max_pixels)
        if not problem and (min_pixels, max_pixels) != (None, None):  # one alone can cross the config's other
            configure_image_size(processor, min_pixels, max_pixels)
            problem = pixel_bounds_error(processor, getattr(self, "model_path", "the model"))
        if problem:
            raise ValueError(problem.replace("--", ""))
        self.model, self.processor = model, processor
        self.raw, self.batch_size, self.max_new_tokens = raw, batch_size, max_new_tokens

    @property
    def pixel_budget(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) every crop is resized into."""
        size = self.processor.image_processor.size
        return size["shortest_edge"], size["longest_edge"]

    def __call__(self, img_or_path: ImageInput) -> str:
        _check_type(img_or_path)  # a wrong type is the caller's bug: manga-ocr raises, so do we
        return self.batch([img_or_path], batch_size=1)[0]

    def read(self, img_or_path: ImageInput) -> Reading:
        """One crop's Reading: `.text` (as __call__ gives it), `.confidence` in [0, 1] (the geometric mean
        probability of its tokens; `.min_probability` beside it) and `.stop` ("eos", "cap" or "loop")."""
        _check_type(img_or_path)
        return self.read_many([img_or_path], batch_size=1)[0]

    def batch(self, images: Sequence[ImageInput], batch_size: int | None = None) -> list[str]:
        """Texts of many crops, in input order; batched generation (crops sorted by size, left padding).

        Always one text per input: an input that cannot be read is answered "" with a warning, so one bad
        crop never loses the others (a crop the processor would refuse is padded into shape)."""
        return [r.text for r in self.read_many(images, batch_size)]

    def read_many(self, images: Sequence[ImageInput], batch_size: int | None = None) -> list[Reading]:
        """Readings of many crops, in input order, batched as `batch`; an unreadable input is answered
        Reading("", "unreadable", 0.0, 0.0) with a warning."""
        from paddleocr_vl_manga.model.generation import generate_readings

        opened: list[Image.Image | None] = []
        for x in images:
            try:
                opened.append(_open(x))
            except (OSError, ValueError) as e:
                warnings.warn(f"manga_ocr_compat: answering '' for an unreadable input: {e}", stacklevel=3)
                opened.append(None)
        good = [im for im in opened if im is not None]
        size = batch_size or self.batch_size
        found = iter(generate_readings(self.model, self.processor, good, batch_size=size,
                                       max_new_tokens=self.max_new_tokens) if good else [])
        readings = [next(found) if im is not None else Reading("", "unreadable", 0.0, 0.0) for im in opened]
        return readings if self.raw else [r._replace(text=post_process(r.text)) for r in readings]
