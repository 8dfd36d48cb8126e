"""Fine-tune PaddleOCR-VL into a Japanese manga OCR model, and serve it: the kit's library.

Stages, each importing only the ones before it: data -> model -> evaluate / export -> train / infer."""
