"""The local OCR server (serve.py): routes (app.py), the batcher between requests and the model (batching.py),
flags and uvicorn (cli.py), the page at / (static/)."""
