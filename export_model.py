"""Export a fine-tuned checkpoint as a drop-in replacement for the base model it was trained from.

    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 [--base PaddlePaddle/PaddleOCR-VL]
    python export_model.py ./sft_output/checkpoint-2000 --out ./ft-2000 --gguf [--gguf_type q8_0]

transformers loads PaddleOCR-VL without two groups of the release's tensors
(``visual.vision_model.embeddings.packing_position_embedding.*`` and ``visual.vision_model.head.*``) and so
saves a model without them; it also writes its own config.json, tokenizer and processor files. vLLM (before
March 2026) and PaddleX refuse such a folder, and a fine-tune with rewritten configs can fail where the base
works. The exported folder has the base's file set instead:

- every file of the base (config.json, tokenizer, preprocessor config, chat template, generation config, ...)
  copied unchanged, except the image processor's pixel bounds when training changed them (--min_pixels /
  --max_pixels, read from the checkpoint's own processor config);
- the weights in the base's key layout, shards and dtype (bf16 for the release): the
  checkpoint's tensors cast to the base's dtype, and the tensors transformers does not load copied from the
  base byte for byte.

sft_paddleocr_vl.py exports its final model this way (in place, in --output_dir); use this command for any
intermediate ``checkpoint-N``. A checkpoint of a LoRA run (--lora_r) holds only the adapter: it is merged into
the base first (model.lora.merge_lora), then exported the same way. The result still loads with
AutoModelForImageTextToText / AutoProcessor.

--out is written whole or not at all: everything (the GGUF files too) is made in a staging folder beside it,
.<name>.export-partial, then renamed into place, so a failure (a failed conversion, a full disk) leaves no
--out and the same command can be run again. An --out that exists (empty, perhaps a mount point) is kept:
the staging folder is made inside it and its files are moved in.

--base is needed only for a folder that does not say which base it was trained from: sft_paddleocr_vl.py
writes base_model.json into every checkpoint and its output folder, and a LoRA checkpoint's
adapter_config.json names its base (base_model_name_or_path).

--gguf also writes, into --out, the files llama.cpp runs (docs/export_gguf.md): model-<type>.gguf (the
language model) and mmproj-<type>.gguf (vision encoder and projector, with the trained pixel bounds), made by
llama.cpp's own converter from the exported folder (export/gguf.py: the converter comes from the pinned
llama-cpp-python source distribution on PyPI, fetched once into ~/.cache/paddleocr-vl-manga, or
LLAMA_CPP_DIR). Their chat template renders llama.cpp's image marker where ours has the image, so
llama-mtmd-cli and llama-server prompt the model exactly as training did. --gguf_type: f16 (default) or
q8_0.

The code: paddleocr_vl_manga.export.layout (this file is a command: nothing imports it)."""

import sys

from paddleocr_vl_manga.export.layout import main

if __name__ == "__main__":
    sys.exit(main())
