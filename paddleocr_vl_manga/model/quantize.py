"""int8 inference on the CPU: `quantize_model(model)` swaps a loaded model's linear layers for int8 ones.

Readers call the model once per text line on laptop CPUs. Each decoded token reads every decoder weight
(the 103,424 x 1,024 lm_head alone is 0.42 GB in fp32), and the vision prefill (~750 patches at the
release's pixel budget) is compute-bound; int8 weights cut the bytes read 4x and int8 matmuls do more
multiply-adds per instruction. The library is PyTorch's own dynamic quantization
(torch.ao.quantization.quantize_dynamic, FBGEMM/x86 kernels on x86, QNNPACK on ARM): weights are stored
int8 per output channel, activations are quantized per call, the matmul runs in int8 with int32
accumulation. It measured fastest on an AVX2 CPU without VNNI, where torchao's int8 configs run in
eager mode as a dequantize-then-fp32 matmul or through torch._int_mm, both slower than fp32, and need
torch.compile to be fast (benchmarks/bench_quantize_cpu.py; figures in docs/quantization.md).

Methods:
  int8       every nn.Linear: the language model, lm_head, the vision encoder and the projector
  int8-text  the language model and lm_head only; the vision encoder and projector stay fp32
Embeddings, convolutions and norms stay fp32 (a lookup reads one row per token; the rest is small).
The result is still the transformers model: model.generation.generate_texts drives it unchanged. It is for
inference only (no training, no save_pretrained of the int8 weights: quantize after loading instead).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import warnings
from typing import Any

import torch
from torch import nn

METHODS = ("int8", "int8-text")
# The vision side of PaddleOCRVLForConditionalGeneration: SigLIP-style encoder and the patch-merging MLP.
VISION_PREFIXES = ("model.visual.", "model.projector.")


class QuantizeError(ValueError):
    """The model cannot be quantized with this method here (unknown method, wrong device or dtype)."""


def _dynamic_quantization() -> tuple[Any, Any]:
    """quantize_dynamic and the per-channel qconfig, or an ImportError saying what to install."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # announced for removal from torch; still in 2.13
        raise ImportError(
            "int8 quantization needs torch.ao.quantization.quantize_dynamic, which torch "
            f"{torch.__version__} no longer has: pip install 'torch>=2.6,<2.14'"
        ) from e
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm", "qnnpack"} & set(engines):
        raise ImportError(
            f"this torch build has no int8 CPU kernels (quantized engines: {engines}): install the "
            "official wheel, pip install torch"
        )
    return quantize_dynamic, per_channel_dynamic_qconfig


def quantized_linear_names(model: nn.Module, method: str = "int8") -> list[str]:
    """Names of the nn.Linear modules that `method` turns into int8 ones."""
    if method not in METHODS:
        raise QuantizeError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (method == "int8" or not name.startswith(VISION_PREFIXES))
    ]


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """Replace the model's linear layers with dynamically quantized int8 ones, in place; return the model.

    The model must be on the CPU in float32 (the int8 kernels take fp32 activations); the weights are
    quantized symmetrically per output channel, the activations per tensor at every call.
    """
    names = quantized_linear_names(model, method)
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QuantizeError(
            f"{method} quantization is a CPU path, but the model is on {', '.join(sorted(devices))}: load it "
            "on the CPU (on a GPU, bf16 is the fast path)"
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        raise QuantizeError(
            f"{method} quantization needs a float32 model, got {', '.join(sorted(map(str, dtypes)))}: load "
            "it with dtype=torch.float32"
        )
    quantize_dynamic, qconfig = _dynamic_quantization()
    with warnings.catch_warnings():
        # torch marks its eager quantization as deprecated (pointing at torchao, whose int8 is slower than
        # fp32 on CPUs without torch.compile); users of the model cannot act on that warning.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_(tensor|channel)")
        quantize_dynamic(model, {name: qconfig for name in names}, dtype=torch.qint8, inplace=True)
    _release_freed_memory()
    return model.eval()


def _release_freed_memory() -> None:
    """Hand the replaced fp32 weights' memory back to the OS. glibc keeps freed heap memory for reuse: the
    full-size model's resident size stayed at 4.7 GiB after int8 quantization, 1.6 GiB after the trim."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass
