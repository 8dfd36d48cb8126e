# `make demo`: the whole pipeline on CPU with synthetic data and a tiny model (< 10 min on 2 cores).
# `make test`: set up .venv (CPU torch where there is no GPU) and run the test suite.
# `make docs`: rewrite the generated tables in README.md and docs/; `make docs-images`: the docs' pictures from
# a `make demo` output folder (tools/write_docs.py).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
DEMO_DIR ?= demo_output

.PHONY: setup gguf-converter test lint demo docs docs-images

$(BIN)/python:
	$(PY) -m venv $(VENV)

# A stamp file keeps `make test` fast on the second run; it is redone when requirements (or the pins below)
# change. The --no-deps packages are for tests: manga-ocr itself (tests/infer/test_compat.py) and owocr, a real
# manga-ocr client (tests/infer/test_owocr.py), which needs Python >= 3.11 (elsewhere pip ignores it: test skipped).
$(VENV)/.installed: requirements.txt requirements-dev.txt Makefile | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		echo "No GPU found: installing the CPU build of torch ($(TORCH))"; \
		$(BIN)/pip install -q $(TORCH); \
	fi
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps manga-ocr==0.1.16
	$(BIN)/pip install -q --no-deps "owocr==1.26.8; python_version >= '3.11'"
	@$(BIN)/python tools/fonts.py --ensure
	@touch $@

# llama.cpp's GGUF converter (export_model.py --gguf), from the pinned llama-cpp-python sdist on PyPI, into
# ~/.cache/paddleocr-vl-manga once (a no-op when there). Not fatal: --gguf fetches it itself, its tests skip.
# Not part of the demo, which makes no GGUF: the first fetch took 2 min (75 s CPU) on the 2-core dev VM.
gguf-converter: $(VENV)/.installed
	@$(BIN)/python -m paddleocr_vl_manga.export.gguf --fetch >/dev/null || echo "warning: no llama.cpp converter (offline?): the GGUF tests will skip"

setup: $(VENV)/.installed gguf-converter

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

demo: $(VENV)/.installed
	PYTHON=$(abspath $(BIN)/python) bash tools/demo.sh

docs: setup
	$(BIN)/python tools/write_docs.py

docs-images: setup
	$(BIN)/python tools/write_docs.py --images $(DEMO_DIR)
