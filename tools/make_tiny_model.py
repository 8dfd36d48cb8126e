"""Build a tiny, random PaddleOCR-VL checkpoint offline, for fast CPU tests.

It uses the real transformers classes (``PaddleOCRVLConfig``, ``PaddleOCRVLForConditionalGeneration``,
``PaddleOCRVLProcessor`` and the image processor that ``AutoImageProcessor`` picks for the released
checkpoint), so the saved folder loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` and no
``trust_remote_code``. Only the sizes differ from the release: a character-level tokenizer over a small
charset, 2+2 layers of width 64 and a small pixel budget.

Usage: python tools/make_tiny_model.py --out fixtures/tiny-paddleocr-vl [--tie_word_embeddings]

``--release_like v1|v1.5|v1.6`` (``build_release_like``) builds instead a fixture shaped like the real
release's files, so code that works on it works on the real checkpoint (README, "Supported bases"): a
SentencePiece-style tokenizer with the release's token ids and its 103424-row vocabulary, the release's chat
template (v1: image markers through the ``image_token`` variable, which transformers 5 overrides; 1.5/1.6:
hard-coded markers and ``Assistant:\n``), its preprocessor_config.json, a flat config.json, bf16 weights in
the release's key layout including the tensors transformers does not load, and a generation_config.json
with ``use_cache: false``. Only the widths and depths are tiny.

For the CPU demo (a model that learns to read within minutes), e.g.:
    python tools/make_tiny_model.py --out ./tiny_model --charset katakana \\
        --init_std 0.1 --vision_init_std 0.2 --min_pixels 784
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import (
    GenerationConfig,
    PaddleOCRVLConfig,
    PaddleOCRVLForConditionalGeneration,
    PaddleOCRVLProcessor,
    TokenizersBackend,
)
from transformers.utils import is_torchvision_available

if __package__ in (None, ""):  # run as `python tools/make_tiny_model.py`: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.make_synthetic_manga109 import CHARSET, CHARSETS  # noqa: E402

# Special tokens with the released tokenizer's string forms; ids 0-2 match the release (<unk>, <s>, </s>).
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
IMAGE_TOKEN, IMAGE_START, IMAGE_END = "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"
VIDEO_TOKEN = "<|video_pad|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, CLS, SEP, IMAGE_TOKEN, IMAGE_START, IMAGE_END, VIDEO_TOKEN]

# Same shape as the released PaddleOCR-VL (v1) chat_template.jinja. The image triplet is written
# literally, not through an `image_token` variable: transformers passes the tokenizer's named special
# tokens (which include image_token=<|IMAGE_PLACEHOLDER|>) into the template, and that would drop
# <|IMAGE_START|>/<|IMAGE_END|>. Our one addition: string message content is accepted as text (the
# release iterates over it and fails).
CHAT_TEMPLATE = """{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- if not cls_token is defined -%}
    {%- set cls_token = "<|begin_of_sentence|>" -%}
{%- endif -%}
{%- if not eos_token is defined -%}
    {%- set eos_token = "</s>" -%}
{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
    {%- if message["content"] is string -%}
        {%- set contents = [{"type": "text", "text": message["content"]}] -%}
    {%- else -%}
        {%- set contents = message["content"] -%}
    {%- endif -%}
    {%- if message["role"] == "user" -%}
        {{- "User: " -}}
        {%- for content in contents -%}
            {%- if content["type"] == "image" -%}
                {{ "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" }}
            {%- endif -%}
        {%- endfor -%}
        {%- for content in contents -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ "\\n" -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant: " -}}
        {%- for content in contents -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ eos_token -}}
    {%- elif message["role"] == "system" -%}
        {%- for content in contents -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] + "\\n" }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant: " -}}
{%- endif -%}"""

# Characters the chat template's literal text needs, whatever the charset.
_ASCII = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n"
def build_tokenizer(charset: str) -> TokenizersBackend:
    """Character-level tokenizer: one token per character of ``charset`` (+ ASCII), unknown chars -> <unk>."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _ASCII + charset:
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges and no pre-tokenizer maps each character to its own id (byte_fallback off, so an
    # unknown character becomes <unk>); Fuse joins tokens on decode instead of the default space-joining.
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False, byte_fallback=False)
    )
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,  # the release pads with <unk> (id 0)
        cls_token=CLS,
        sep_token=SEP,
        image_token=IMAGE_TOKEN,  # a *_token kwarg becomes a named special token: tokenizer.image_token(_id)
        extra_special_tokens=[IMAGE_START, IMAGE_END, VIDEO_TOKEN],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _image_processor_class() -> type:
    # AutoImageProcessor picks the torchvision backend when torchvision is installed, else the PIL one.
    if is_torchvision_available():
        from transformers import PaddleOCRVLImageProcessor

        return PaddleOCRVLImageProcessor
    from transformers import PaddleOCRVLImageProcessorPil

    return PaddleOCRVLImageProcessorPil


# Small pixel budget so CPU tests stay fast: 16..64 merged 28x28 cells, i.e. 16..64 image tokens per crop
# (a 40x120 (w x h) crop -> 84x196 px -> 21 tokens; 40x160 -> 16; 120x60 -> 18). The release uses
# min_pixels=147384 / max_pixels=2822400; those belong to the real checkpoint, not to this fixture.
TINY_MIN_PIXELS = 28 * 28 * 16
TINY_MAX_PIXELS = 28 * 28 * 64


def _random_model(
    *,
    vocab_size: int,
    ids: dict[str, int],
    hidden: int,
    text_layers: int,
    vision_layers: int,
    tie_word_embeddings: bool,
    seed: int,
    init_std: float | None,
    vision_init_std: float | None,
) -> PaddleOCRVLForConditionalGeneration:
    """A randomly initialised PaddleOCR-VL of the given width (4 heads) and depths, seeded."""
    if hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16 (4 heads, axial vision rope), got {hidden}")
    heads = 4
    head_dim = hidden // heads
    # M-RoPE splits head_dim/2 rotary frequencies over (t, h, w); keep the release's 16:24:24 proportions.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": mrope_section},
        "pad_token_id": ids["pad"],
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        # Set here as well as on the outer config: PaddleOCRVLConfig forwards text_config's value (default
        # True) to the outer config, which would silently tie an untied model.
        "tie_word_embeddings": tie_word_embeddings,
    }
    vision_config = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": heads,
        "patch_size": 14,
        "spatial_merge_size": 2,
    }
    from paddleocr_vl_manga.model.loading import (
        declare_mrope_section,  # transformers does not list the key it reads: no warning
    )

    declare_mrope_section()
    config = PaddleOCRVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = PaddleOCRVLForConditionalGeneration(config).eval()
        if init_std is not None or vision_init_std is not None:
            _redraw_weights(model, init_std, vision_init_std)
    return model


def _image_processor(min_pixels: int, max_pixels: int):
    # The release's preprocessor_config uses mean/std 0.5 (not the class's CLIP defaults) and bicubic.
    return _image_processor_class()(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    charset: str,
    text_layers: int = 2,
    vision_layers: int = 2,
    hidden: int = 64,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    init_std: float | None = None,
    vision_init_std: float | None = None,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> str:
    """Save a random tiny PaddleOCR-VL (model, processor, generation config) to ``out_dir``; return it.

    init_std / vision_init_std: redraw the weights of every Linear, Conv2d and Embedding of the language model
    (init_std) or of the vision tower and projector (vision_init_std) from N(0, std), biases and norms kept.
    None keeps transformers' initializer_range 0.02, under which a model this small sits for thousands of
    steps on a plateau where it ignores the image (random vision features are nearly the same for every crop).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(charset)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    model = _random_model(
        vocab_size=len(tokenizer),
        ids={
            "pad": ids[UNK], "bos": ids[BOS], "eos": ids[EOS], "image": ids[IMAGE_TOKEN],
            "video": ids[VIDEO_TOKEN], "vision_start": ids[IMAGE_START], "vision_end": ids[IMAGE_END],
        },
        hidden=hidden, text_layers=text_layers, vision_layers=vision_layers, seed=seed,
        tie_word_embeddings=tie_word_embeddings, init_std=init_std, vision_init_std=vision_init_std,
    )
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[UNK],
        max_new_tokens=64,
        do_sample=False,
        use_cache=True,
    )
    model.save_pretrained(out, safe_serialization=True)

    image_processor = _image_processor(min_pixels, max_pixels)
    processor = PaddleOCRVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    _write_manifest(out, charset=charset, seed=seed, ids=ids)
    return str(out)


# ---------------------------------------------------------------- release-like fixture
# What is known about the real files (README, "Supported bases"): token ids from transformers' integration
# test and several ports; the tokenizer is SentencePiece converted with add_prefix_space=False (no "▁" before
# the first word), byte fallback for characters outside the vocabulary, and "▁" merged with a following Latin
# letter or digit ("Assistant: OK" in one pass ends ":", "▁O", "K").

RELEASE_SPECIAL_IDS = {
    UNK: 0, BOS: 1, EOS: 2, CLS: 100273, IMAGE_TOKEN: 100295, IMAGE_START: 101305, IMAGE_END: 101306,
    VIDEO_TOKEN: 101307,  # the converted config's video_token_id; the token's text is not known
}
# Pieces whose ids are known from the integration test's prompt (and " w" -> "▁w" = 296).
RELEASE_PIECES = {"▁w": 296, "CR": 2497, "User": 2969, "Assistant": 92267, "▁": 93919, ":": 93963, "O": 93972}
RELEASE_SP_PIECES = 100295  # SentencePiece pieces 0..100294; added tokens from 100295 (1019 of them)
RELEASE_ADDED_END = 101314
RELEASE_VOCAB_SIZE = 103424  # embedding rows (more than the tokenizer's 101314 ids, as in the release)
RELEASE_MROPE_SECTION = [16, 24, 24]  # (t, h, w) rotary frequencies of head_dim 128
BYTE_FALLBACK_START = 13  # <0x00>..<0xFF> at 13..268, so "\n" = <0x0A> = 23
# Tensors in the released model.safetensors that transformers skips on load (and so never saves).
PACKING_POSITIONS = 32768

# The v1 template as published by PaddleX: the image markers come from a variable `image_token` whose
# default is the triplet, used only when the caller has not defined it. transformers 5 passes the tokenizer's
# named special tokens (image_token=<|IMAGE_PLACEHOLDER|>) into every template, so this renders
# "User: <|IMAGE_PLACEHOLDER|>OCR:" without the start/end markers: the bug the loader corrects.
V1_CHAT_TEMPLATE = """{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- if not cls_token is defined -%}
    {%- set cls_token = "<|begin_of_sentence|>" -%}
{%- endif -%}
{%- if not eos_token is defined -%}
    {%- set eos_token = "</s>" -%}
{%- endif -%}
{%- if not image_token is defined -%}
    {%- set image_token = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -%}
{%- endif -%}
{{- cls_token -}}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {{- "User: " -}}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "image" -%}
                {{ image_token }}
            {%- endif -%}
        {%- endfor -%}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ "\n" -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant: " -}}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] }}
            {%- endif -%}
        {%- endfor -%}
        {{ eos_token -}}
    {%- elif message["role"] == "system" -%}
        {%- for content in message["content"] -%}
            {%- if content["type"] == "text" -%}
                {{ content["text"] + "\n" }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant: " -}}
{%- endif -%}"""
# PaddleOCR-VL-1.5 and 1.6: the same template with the markers written literally and "Assistant:\n".
V15_CHAT_TEMPLATE = (
    V1_CHAT_TEMPLATE.replace(
        '{%- if not image_token is defined -%}\n'
        '    {%- set image_token = "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" -%}\n'
        '{%- endif -%}\n',
        "",
    )
    .replace("{{ image_token }}", '{{ "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>" }}')
    .replace('"Assistant: "', '"Assistant:\\n"')
)
# version -> (chat template, min_pixels, max_pixels of its preprocessor_config.json)
RELEASES: dict[str, tuple[str, int, int]] = {
    "v1": (V1_CHAT_TEMPLATE, 147384, 2822400),
    "v1.5": (V15_CHAT_TEMPLATE, 112896, 1003520),
    "v1.6": (V15_CHAT_TEMPLATE, 112896, 1003520),
}


def _merge_chain(word: str) -> list[tuple[str, str]]:
    return [(word[: i - 1], word[i - 1]) for i in range(2, len(word) + 1)]


def build_release_tokenizer(charset: str = CHARSET, *, add_prefix_space: bool = False) -> TokenizersBackend:
    """A SentencePiece-style tokenizer with the release's ids: spaces as "▁", byte fallback, "▁"+Latin merges.

    ``add_prefix_space``: also put a "▁" before the start of a text, as transformers 5's Llama-style
    SentencePiece tokenizers do by default (Metaspace, prepend_scheme "first": not after a special token,
    so the prompt, which starts with one, is tokenized the same; a text on its own starts with "▁").

    Every character of ``charset`` (and printable ASCII) is a piece of its own, so training can learn it; the
    pieces whose ids are known sit at those ids, the rest of the 100295 SentencePiece ids are unused fillers.
    """
    merges = [m for w in ("User", "Assistant", "CR") for m in _merge_chain(w)]
    merges += [("▁", c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = {t: i for t, i in RELEASE_SPECIAL_IDS.items() if i < RELEASE_SP_PIECES}
    vocab |= RELEASE_PIECES | {f"<0x{b:02X}>": BYTE_FALLBACK_START + b for b in range(256)}
    taken = set(vocab.values())
    free = (i for i in range(RELEASE_SP_PIECES) if i not in taken)
    for piece in [chr(c) for c in range(0x21, 0x7F)] + sorted(set(charset)) + [a + b for a, b in merges]:
        if piece not in vocab and not piece.isspace():
            vocab[piece] = next(free)
    vocab |= {f"<unused_{i}>": i for i in free}
    added = {i: f"<|RESERVED_{i}|>" for i in range(RELEASE_SP_PIECES, RELEASE_ADDED_END)}
    added |= {i: t for t, i in RELEASE_SPECIAL_IDS.items()}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in sorted(added.items())
        ],
        # No Prepend("▁"): the release was converted with add_prefix_space=False ("User" at the start is
        # "User", not "▁User"); no pre-tokenizer, so "▁" merges with the next letter as SentencePiece does.
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
            "merges": [list(m) for m in merges],
        },
    }
    if add_prefix_space:  # what transformers 5's LlamaTokenizer builds with add_prefix_space=True
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                 "split": False}
        spec["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return TokenizersBackend(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        add_prefix_space=add_prefix_space,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,
        cls_token=CLS,
        image_token=IMAGE_TOKEN,
        extra_special_tokens=[IMAGE_START, IMAGE_END, VIDEO_TOKEN],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        model_max_length=131072,
    )


def release_processor(
    version: str = "v1", charset: str = CHARSET, *, add_prefix_space: bool = False
) -> PaddleOCRVLProcessor:
    """The release-like processor (tokenizer, chat template, image bounds) in memory, without a model."""
    template, min_pixels, max_pixels = RELEASES[version]
    return PaddleOCRVLProcessor(
        image_processor=_image_processor(min_pixels, max_pixels),
        tokenizer=build_release_tokenizer(charset, add_prefix_space=add_prefix_space),
        chat_template=template,
    )


def _flat_config(nested: dict) -> dict:
    """config.json in the release's flat layout: the text model's keys at the top level, no text_config."""
    config = dict(nested)
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "tie_word_embeddings", "dtype"):
        text.pop(key, None)
    config.update(text)
    # A config without mrope_section (PaddleOCRVLConfig()'s) gets transformers' default, the release's value.
    section = rope.get("mrope_section", RELEASE_MROPE_SECTION)
    config["rope_scaling"] = {"mrope_section": section, "rope_type": "default",
                              "type": "default"}
    config["rope_theta"] = rope["rope_theta"]
    config.update(tie_word_embeddings=False, use_cache=False, torch_dtype="bfloat16")
    for key in ("dtype", "transformers_version"):
        config.pop(key, None)
    vision = config["vision_config"]
    vision.pop("rope_parameters", None)  # a transformers 5 addition; the release's vision_config lacks it
    vision["model_type"] = "paddleocr_vl"  # what the release has; transformers fixes it up
    return dict(sorted(config.items()))


def _dropped_tensors(hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """The release's tensors that transformers ignores on load: the packing position embedding and the
    SigLIP attention-pooling head (names as in the release; values random)."""
    gen = torch.Generator().manual_seed(seed + 1)
    inter = 2 * hidden
    shapes = {
        "embeddings.packing_position_embedding.weight": (PACKING_POSITIONS, hidden),
        "head.probe": (1, 1, hidden),
        "head.attention.in_proj_weight": (3 * hidden, hidden),
        "head.attention.in_proj_bias": (3 * hidden,),
        "head.attention.out_proj.weight": (hidden, hidden),
        "head.attention.out_proj.bias": (hidden,),
        "head.layernorm.weight": (hidden,),
        "head.layernorm.bias": (hidden,),
        "head.mlp.fc1.weight": (inter, hidden),
        "head.mlp.fc1.bias": (inter,),
        "head.mlp.fc2.weight": (hidden, inter),
        "head.mlp.fc2.bias": (hidden,),
    }
    return {
        f"visual.vision_model.{name}": (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }


def build_release_like(
    out_dir: str | Path,
    version: str = "v1",
    *,
    charset: str = CHARSET,
    text_layers: int = 2,
    vision_layers: int = 2,
    hidden: int = 32,
    seed: int = 0,
    init_std: float | None = None,
    vision_init_std: float | None = None,
    sentencepiece_model: bool = False,
    add_prefix_space: bool = False,
) -> str:
    """Save a tiny random PaddleOCR-VL laid out like the real release ``version`` (v1, v1.5, v1.6).

    ``sentencepiece_model``: also write the release's tokenizer.model (tokenizer.json's pieces), which
    llama.cpp's converter reads (the GGUF export); transformers uses tokenizer.json either way.
    ``add_prefix_space``: a tokenizer that puts "▁" before a text's start (build_release_tokenizer)."""
    if version not in RELEASES:
        raise ValueError(f"unknown release {version!r}; choose from {', '.join(RELEASES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = release_processor(version, charset, add_prefix_space=add_prefix_space)
    ids = {
        "pad": 0, "bos": 1, "eos": 2, "image": RELEASE_SPECIAL_IDS[IMAGE_TOKEN],
        "video": RELEASE_SPECIAL_IDS[VIDEO_TOKEN], "vision_start": RELEASE_SPECIAL_IDS[IMAGE_START],
        "vision_end": RELEASE_SPECIAL_IDS[IMAGE_END],
    }
    model = _random_model(
        vocab_size=RELEASE_VOCAB_SIZE, ids=ids, hidden=hidden, text_layers=text_layers,
        vision_layers=vision_layers, tie_word_embeddings=False, seed=seed, init_std=init_std,
        vision_init_std=vision_init_std,
    )
    save_release_layout(model, processor, out, version, extra_tensors=_dropped_tensors(hidden, seed),
                        sentencepiece_model=sentencepiece_model)
    return str(out)


def save_release_layout(
    model: PaddleOCRVLForConditionalGeneration,
    processor: PaddleOCRVLProcessor,
    out: Path,
    version: str = "v1",
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    sentencepiece_model: bool = False,
) -> None:
    """Write `model` (left as it is in memory) and `processor` to `out` in the release's file layout: bf16
    weights under the release's key names plus `extra_tensors`, its flat config.json, generation config,
    tokenizer (and tokenizer.model when `sentencepiece_model`) and top-level-bounds preprocessor_config.json.

    ``sentencepiece_model``: also write the release's tokenizer.model (tokenizer.json's pieces), which
    llama.cpp's converter reads (the GGUF export); transformers uses tokenizer.json either way."""
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100GB")  # the release's key names
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(out / "model.safetensors")).items()}
    save_file(weights | (extra_tensors or {}), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    _write_json(out / "config.json", _flat_config(config))
    _write_json(out / "generation_config.json", {"eos_token_id": 2, "pad_token_id": 0, "use_cache": False})

    processor.save_pretrained(out)
    # The release ships preprocessor_config.json with top-level pixel bounds (transformers 5 writes a
    # processor_config.json with a nested image processor and a `size` dict instead).
    (out / "processor_config.json").unlink()
    if sentencepiece_model:
        write_sentencepiece_model(out / "tokenizer.json", out / "tokenizer.model")
    ip = processor.image_processor
    _write_json(out / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": ip.image_mean, "image_processor_type": "PaddleOCRVLImageProcessor",
        "image_std": ip.image_std, "max_pixels": RELEASES[version][2], "merge_size": ip.merge_size,
        "min_pixels": RELEASES[version][1], "patch_size": ip.patch_size,
        "processor_class": "PaddleOCRVLProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "temporal_patch_size": 1,
    })

# SentencePiece piece types (sentencepiece_model.proto) and the wire format, written by hand: the fixture
# needs no protobuf package.
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_UNUSED, SP_BYTE = 1, 2, 3, 5, 6


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int | float) -> bytes:
    if isinstance(value, bytes):  # length-delimited (strings, messages)
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):  # fixed32
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(value)  # varint (ints, enums, bools)


def write_sentencepiece_model(tokenizer_json: Path, out: Path) -> None:
    """A BPE tokenizer.model (ModelProto) with tokenizer.json's SentencePiece pieces (ids below
    RELEASE_SP_PIECES; the added tokens above are not SentencePiece pieces, as in the release): byte fallback,
    no dummy prefix, merge priority as score (lower id first)."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    pieces = sorted((i, t) for t, i in vocab.items() if i < RELEASE_SP_PIECES)
    if [i for i, _ in pieces] != list(range(RELEASE_SP_PIECES)):
        raise ValueError(f"{tokenizer_json}: SentencePiece ids are not 0..{RELEASE_SP_PIECES - 1}")
    body = bytearray()
    for i, piece in pieces:
        kind = (SP_UNKNOWN if piece == UNK else SP_CONTROL if piece in (BOS, EOS)
                else SP_BYTE if piece.startswith("<0x") else SP_UNUSED if piece.startswith("<unused_")
                else SP_NORMAL)
        body += _field(1, _field(1, piece.encode()) + _field(2, -float(i)) + _field(3, kind))
    # TrainerSpec: model_type BPE (2), vocab_size, byte_fallback; unk/bos/eos ids are the defaults 0/1/2.
    body += _field(2, _field(3, 2) + _field(4, RELEASE_SP_PIECES) + _field(35, 1))
    # NormalizerSpec: no "▁" before the text (add_dummy_prefix false), spaces kept, escaped as "▁".
    body += _field(3, _field(1, b"identity") + _field(3, 0) + _field(4, 0) + _field(5, 1))
    out.write_bytes(bytes(body))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def _redraw_weights(model: torch.nn.Module, text_std: float | None, vision_std: float | None) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            continue
        std = vision_std if name.split(".")[1:2] in (["visual"], ["projector"]) else text_std
        if std is not None:
            module.weight.normal_(0.0, std)
            if getattr(module, "padding_idx", None) is not None:
                module.weight[module.padding_idx].zero_()


def _write_manifest(out: Path, *, charset: str, seed: int, ids: dict[str, int]) -> None:
    # Lets a test or a person see what fixture this is without loading it.
    info = {
        "kind": "tiny-random-paddleocr-vl",
        "seed": seed,
        "charset_size": len(charset),
        "special_ids": ids,
    }
    (out / "tiny_model_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--charset",
        default="full",
        choices=list(CHARSETS),
        help="build the tokenizer from this named charset of tools/make_synthetic_manga109.py (its "
        "--charset): full (default, its CHARSET) or a small one for the demo",
    )
    parser.add_argument("--text_layers", type=int, default=2, help="decoder layers")
    parser.add_argument(
        "--vision_layers", type=int, default=None,
        help="vision encoder layers (default 2, --release_like 3: llama.cpp's converter maps the projector's "
        "two layers through the encoder's per-layer table, so export_model.py --gguf needs at least 3)",
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="width, a multiple of 16 (default 64, --release_like 32)"
    )
    parser.add_argument(
        "--release_like",
        choices=list(RELEASES),
        default=None,
        help="lay the model out like that real release (tokenizer, token ids, 103424-row vocabulary, chat "
        "template, processor config, flat config.json, bf16 weights in the release's key layout with the "
        "tensors transformers skips) instead of the character-level fixture",
    )
    parser.add_argument(
        "--tie_word_embeddings", action="store_true",
        help="tie lm_head to the embeddings (untied in the release)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--init_std",
        type=float,
        default=None,
        help="redraw the language model's Linear/Embedding weights from N(0, std) (default: transformers' "
        "0.02). 0.1 with --vision_init_std 0.2 lets the tiny model learn to read much sooner",
    )
    parser.add_argument(
        "--vision_init_std",
        type=float,
        default=None,
        help="the same for the vision tower and projector (default 0.02): 0.2 makes the random image "
        "features differ from crop to crop",
    )
    parser.add_argument(
        "--min_pixels",
        type=int,
        default=None,
        help=f"image processor min_pixels (default {TINY_MIN_PIXELS}: at least 16 image tokens per crop; "
        "784 = one 28x28 token, so crops are not upscaled and a 12-30 px glyph is about one token)",
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=None,
        help=f"image processor max_pixels (default {TINY_MAX_PIXELS}: at most 64 image tokens per crop)",
    )
    args = parser.parse_args(argv)
    final = Path(args.out)
    if final.exists() and not final.is_dir():
        parser.error(f"--out {final} is a file, not a folder")
    # Built whole in a staging folder beside --out, then moved into place: a Ctrl-C or a full disk never
    # leaves a half-made model where a test or train.sh would load it.
    # An existing --out stays and is staged inside: it may be a mount point (a Docker volume), which can't
    # be renamed onto and whose parent is another file system ("Invalid cross-device link").
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final / ".partial" if final.is_dir() else final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    try:
        _build(args, parser, staging)
        if final.exists():  # rebuilding into an existing folder replaces its files, as before
            for path in sorted(staging.iterdir()):
                os.replace(path, final / path.name)
        else:
            os.rename(staging, final)
    except OSError as e:
        print(f"error: could not write {e.filename or final}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(final)
    return 0


def _build(args: argparse.Namespace, parser: argparse.ArgumentParser, out: Path) -> None:
    common = {
        "charset": CHARSETS[args.charset], "text_layers": args.text_layers,
        "vision_layers": args.vision_layers or (3 if args.release_like else 2), "seed": args.seed,
        "init_std": args.init_std, "vision_init_std": args.vision_init_std,
    }
    if args.release_like:
        fixed = [f for f in ("min_pixels", "max_pixels", "tie_word_embeddings") if getattr(args, f)]
        if fixed:
            parser.error(f"--{fixed[0]}: a release-like model has the release's (untied, its pixel bounds)")
        # With the release's tokenizer.model, as the release ships it: export_model.py --gguf needs it.
        build_release_like(out, args.release_like, hidden=args.hidden or 32, sentencepiece_model=True,
                           **common)
    else:
        build_tiny_model(
            out,
            hidden=args.hidden or 64,
            tie_word_embeddings=args.tie_word_embeddings,
            min_pixels=args.min_pixels or TINY_MIN_PIXELS,
            max_pixels=args.max_pixels or TINY_MAX_PIXELS,
            **common,
        )


if __name__ == "__main__":
    sys.exit(main())
