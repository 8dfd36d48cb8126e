"""Build a tiny, random PaddleOCR-VL checkpoint offline, for fast CPU tests.

It uses the real transformers classes (``PaddleOCRVLConfig``, ``PaddleOCRVLForConditionalGeneration``,
``PaddleOCRVLProcessor`` and the image processor that ``AutoImageProcessor`` picks for the released
checkpoint), so the saved folder loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` and no
``trust_remote_code``. Only the sizes differ from the release: a character-level tokenizer over a small
charset, 2+2 layers of width 64 and a small pixel budget.

Usage: python tools/make_tiny_model.py --out fixtures/tiny-paddleocr-vl [--tie_word_embeddings]

For the CPU demo (a model that learns to read within minutes), e.g.:
    python tools/make_tiny_model.py --out ./tiny_model --charset katakana \\
        --init_std 0.1 --vision_init_std 0.2 --min_pixels 784
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
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
from tools.make_synthetic_manga109 import CHARSETS  # noqa: E402

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
    if hidden % 16:
        raise ValueError(f"hidden must be a multiple of 16 (4 heads, axial vision rope), got {hidden}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(charset)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    heads = 4
    head_dim = hidden // heads
    # M-RoPE splits head_dim/2 rotary frequencies over (t, h, w); keep the release's 16:24:24 proportions.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]

    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": mrope_section},
        "pad_token_id": ids[UNK],
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
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
    config = PaddleOCRVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[IMAGE_START],
        vision_end_token_id=ids[IMAGE_END],
        tie_word_embeddings=tie_word_embeddings,
    )

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = PaddleOCRVLForConditionalGeneration(config).eval()
        if init_std is not None or vision_init_std is not None:
            _redraw_weights(model, init_std, vision_init_std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[UNK],
        max_new_tokens=64,
        do_sample=False,
        use_cache=True,
    )
    model.save_pretrained(out, safe_serialization=True)

    # The release's preprocessor_config uses mean/std 0.5 (not the class's CLIP defaults) and bicubic.
    image_processor = _image_processor_class()(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )
    processor = PaddleOCRVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    _write_manifest(out, charset=charset, seed=seed, ids=ids)
    return str(out)


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
    parser.add_argument("--text_layers", type=int, default=2)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="width, a multiple of 16 (default 64)")
    parser.add_argument("--tie_word_embeddings", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
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
        default=TINY_MIN_PIXELS,
        help=f"image processor min_pixels (default {TINY_MIN_PIXELS}: at least 16 image tokens per crop; "
        "784 = one 28x28 token, so crops are not upscaled and a 12-30 px glyph is about one token)",
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=TINY_MAX_PIXELS,
        help=f"image processor max_pixels (default {TINY_MAX_PIXELS}: at most 64 image tokens per crop)",
    )
    args = parser.parse_args(argv)

    out = build_tiny_model(
        args.out,
        charset=CHARSETS[args.charset],
        text_layers=args.text_layers,
        vision_layers=args.vision_layers,
        hidden=args.hidden,
        tie_word_embeddings=args.tie_word_embeddings,
        seed=args.seed,
        init_std=args.init_std,
        vision_init_std=args.vision_init_std,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
