"""Reading crops and pages: predict and the manga-ocr-compatible `MangaOcr`."""
