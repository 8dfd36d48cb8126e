"""The vision tower (SigLIP-style encoder + patch-merging projector) on a compiled CPU runtime.

    model = attach_vision_runtime(model, "openvino")      # or "onnxruntime"; "torch" leaves it as it is

At manga-ocr's pixel budget (min_pixels 50,176: 256 patches, 64 image tokens) the tower is the largest part
of a line's CPU time (docs/inference.md). This module cuts it out of the transformers model as one graph per
image with only shape-free inputs, hands that graph to a CPU runtime, and routes the model's
get_image_features through it; the language model is untouched (PyTorch, int8 or not).

How the tower is cut (as the OpenVINO PaddleOCR-VL notebook cuts it into vision + vision_mlp models, but
with everything that depends on the image's grid computed outside the graph, so one graph serves every
crop size with a dynamic patch count N and nothing is re-traced):
  in PyTorch, per image   the grid's position embeddings (bilinear resampling of the 27 x 27 learned table,
                          N x 1152), the 2-D rotary cos/sin (N x 72 each) and the projector's 2 x 2 merge
                          order (a permutation of N)
  in the graph            patch embedding (conv 14 x 14), 27 encoder layers (attention over the image's own
                          N patches: one graph call per image, so no mask), post-norm, the projector
                          (pre-norm, gather by the merge order, 2 linears) -> N / 4 x 1024 features

Runtimes (optional packages; a missing one is a one-line ImportError naming the pip command):
  openvino      OpenVINO's CPU plugin; linear weights int8 (per output channel, symmetric) when int8 is
                asked, stored compressed and widened in the kernel, as nncf.compress_weights does
  onnxruntime   ONNX Runtime's CPU provider; int8: its dynamic quantization (int8 weights per channel,
                activations quantized per call, MatMulInteger) as PyTorch's int8 path does
The graph is built once at load (seconds to a minute for the full-size tower) in a temporary folder.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

RUNTIMES = ("torch", "openvino", "onnxruntime")
PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}  # runtime -> pip package


class VisionRuntimeError(ValueError):
    """The runtime cannot be used for this model (unknown name, not on the CPU, not fp32)."""


def require(runtime: str) -> Any:
    """The runtime's Python module, or an ImportError whose message is one line saying what to install."""
    if runtime not in PACKAGES:
        raise VisionRuntimeError(f"unknown vision runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    try:
        return __import__(PACKAGES[runtime])
    except ImportError as e:
        raise ImportError(
            f"--vision_runtime {runtime} needs the {PACKAGES[runtime]} package, which is not installed: "
            f"pip install {PACKAGES[runtime]} (or leave the flag out: PyTorch runs the vision tower)"
        ) from e


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionCore(nn.Module):
    """The tower from patches to projected features for ONE image, with the grid's tensors as inputs.

    The same arithmetic as transformers' PaddleOCRVisionModel + PaddleOCRProjector (checked against it in
    tests/model/test_vision_runtime.py), written with shapes taken from N only, so that tracing it gives a
    graph valid for every grid."""

    def __init__(self, visual: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.vision_model = visual.vision_model
        self.projector = projector
        self.merge = projector.merge_kernel_size[0] * projector.merge_kernel_size[1]

    def forward(self, patches: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                order: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches).flatten(1) + pos
        n = x.shape[0]
        cos, sin = cos[:, None, :], sin[:, None, :]
        for layer in vm.encoder.layers:
            att = layer.self_attn
            h = layer.layer_norm1(x)
            q, k, v = (proj(h).view(n, att.num_heads, att.head_dim) for proj in (att.q_proj, att.k_proj,
                                                                                   att.v_proj))
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               scale=att.scaling)
            x = x + att.out_proj(o.transpose(0, 1).reshape(n, -1))
            x = x + layer.mlp(layer.layer_norm2(x))
        p = self.projector
        x = p.pre_norm(vm.post_layernorm(x))[order].reshape(n // self.merge, -1)
        return p.linear_2(p.act(p.linear_1(x)))


def grid_inputs(core: VisionCore, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """pos, cos, sin, order for one image's grid (t, h, w): what the graph takes besides its patches."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights as interpolation
    from transformers.vision_utils import get_vision_position_ids

    emb, grid = core.vision_model.embeddings, grid.reshape(1, 3)
    idx, weights = interpolation(
        grid, num_grid_per_side=emb.num_grid_per_side, mode=emb.interpolation_mode,
        align_corners=emb.interpolation_align_corners, spatial_merge_size=1,
    )
    pos = (emb.position_embedding(idx) * weights[:, :, None]).sum(1)
    position_ids = get_vision_position_ids(grid, 1)
    cos, sin = core.vision_model.encoder.rotary_pos_emb(pos, position_ids)
    t, h, w = (int(v) for v in grid[0])
    m1, m2 = core.projector.merge_kernel_size
    order = torch.arange(t * h * w).reshape(t, h // m1, m1, w // m2, m2).transpose(2, 3).reshape(-1)
    return pos, cos, sin, order


def _example(core: VisionCore, side: int = 8) -> tuple[torch.Tensor, ...]:
    """Trace inputs: a side x side grid (N = 64 patches); the graph's N stays dynamic."""
    ps = core.vision_model.embeddings.patch_size
    grid = torch.tensor([[1, side, side]])
    return (torch.zeros(side * side, 3, ps, ps), *grid_inputs(core, grid))


class _Int8Linear(nn.Module):
    """nn.Linear with int8 weights (symmetric, per output channel), widened to fp32 at the matmul. Traced,
    the widening is Constant(i8) -> Convert -> Multiply(scale), the decompression pattern OpenVINO keeps
    compressed (as nncf.compress_weights writes it) and its CPU plugin runs inside the matmul."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        self.register_buffer("weight_i8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_i8.to(torch.float32) * self.scale, self.bias)


def _int8_weights(module: nn.Module) -> nn.Module:
    """module with every nn.Linear replaced by an _Int8Linear (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, _Int8Linear(child))
        else:
            _int8_weights(child)
    return module


def _openvino(core: VisionCore, int8: bool, threads: int, folder: Path, in_place: bool) -> Any:
    ov = require("openvino")
    if int8:  # in place when the PyTorch tower is dropped afterwards: no 1.7 GB copy of it
        import copy

        core = _int8_weights(core if in_place else copy.deepcopy(core))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints from shapes: N stays dynamic
        graph = ov.convert_model(core, example_input=_example(core))
    return ov.Core().compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                   "PERFORMANCE_HINT": "LATENCY"})


def _onnxruntime(core: VisionCore, int8: bool, threads: int, folder: Path, in_place: bool) -> Any:
    ort = require("onnxruntime")
    names = ["patches", "pos", "cos", "sin", "order"]
    path = folder / "vision.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(core, _example(core), str(path), input_names=names, output_names=["features"],
                          dynamic_axes={name: {0: "n"} for name in names} | {"features": {0: "m"}},
                          dynamo=False, external_data=True)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = folder / "vision_int8.onnx"
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=True)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# The full-size tower (1.7 GB in fp32) passed 14 GB resident while its int8 graph was built, by either
# runtime, and was stopped unfinished (docs/inference.md): at least 8x the tower's own fp32 bytes.
INT8_BUILD_MEMORY_FACTOR = 8


def available_memory() -> int | None:
    """Bytes the OS says a new allocation can get (MemAvailable), or None where /proc/meminfo has none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def warn_if_int8_build_may_not_fit(core: nn.Module, runtime: str) -> None:
    """Warn before an int8 build that may exhaust memory: killed minutes in is all a user would see."""
    need = INT8_BUILD_MEMORY_FACTOR * sum(p.numel() * p.element_size() for p in core.parameters())
    free = available_memory()
    if free is not None and need > free:
        warnings.warn(f"--vision_runtime {runtime} with --quantize int8 builds an int8 graph of the vision "
                      f"tower at load, which needs about {need / 1e9:.1f} GB of memory (the full-size "
                      f"tower's build passed 14 GB); {free / 1e9:.1f} GB is available: if it is killed, "
                      "leave --vision_runtime out (PyTorch's int8 tower) or --quantize int8 off",
                      stacklevel=3)


class CompiledVision(nn.Module):
    """get_image_features' vision part on a compiled runtime: features of every image, concatenated.

    A module so that forward hooks (benchmarks/bench_compat_cpu.py's clock) see its calls."""

    def __init__(self, core: VisionCore, runtime: str, int8: bool, threads: int,
                 in_place: bool = False) -> None:
        super().__init__()
        self.runtime, self.int8 = runtime, int8
        self._grid_inputs = lambda grid: grid_inputs(core, grid)
        with tempfile.TemporaryDirectory() as tmp:  # ONNX Runtime reads the file at session creation
            build = _openvino if runtime == "openvino" else _onnxruntime
            self._session = build(core, int8, threads, Path(tmp), in_place)
        self._names = ["patches", "pos", "cos", "sin", "order"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-3:]).to(torch.float32)
        features, start = [], 0
        for grid in grid_thw:
            n = int(grid.prod())
            arrays = [t.numpy() for t in (pixel_values[start : start + n], *self._grid_inputs(grid))]
            start += n
            if self.runtime == "openvino":
                out = self._session(arrays)[0]
            else:
                out = self._session.run(None, dict(zip(self._names, arrays, strict=True)))[0]
            features.append(torch.from_numpy(out))
        return torch.cat(features)


def attach_vision_runtime(model: Any, runtime: str, *, int8: bool = True, threads: int | None = None,
                          release_tower: bool = True) -> Any:
    """Route `model`'s image features through `runtime` (RUNTIMES); return the model (changed in place).

    int8: linear weights int8 (default, as `quantize="int8"` does for PyTorch's tower); threads: the
    runtime's intra-op threads (default torch.get_num_threads(), which loading sets). The model must be an
    fp32 model on the CPU, its tower not quantized by PyTorch. release_tower: drop the PyTorch encoder
    layers once the runtime holds its own copy of the weights (1.7 GB in fp32 for the full-size tower)."""
    if runtime not in RUNTIMES:
        raise VisionRuntimeError(f"unknown vision runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return model
    require(runtime)
    inner = model.model
    devices = {p.device.type for p in inner.visual.parameters()}
    if devices != {"cpu"}:
        raise VisionRuntimeError(f"--vision_runtime {runtime} is a CPU path, but the model is on "
                                 f"{', '.join(sorted(devices))}: load it on the CPU")
    if inner.visual.dtype != torch.float32:
        raise VisionRuntimeError(f"--vision_runtime {runtime} needs a float32 model, got "
                                 f"{inner.visual.dtype}")
    core = VisionCore(inner.visual, inner.projector).eval()
    if int8:
        warn_if_int8_build_may_not_fit(core, runtime)
    compiled = CompiledVision(core, runtime, int8, threads or torch.get_num_threads(), in_place=release_tower)
    inner.vision_runtime = compiled
    if release_tower:
        core.vision_model.encoder.layers = nn.ModuleList()
        from paddleocr_vl_manga.model.quantize import _release_freed_memory

        _release_freed_memory()
    merge = core.merge

    def get_image_features(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        embeds = compiled(pixel_values, image_grid_thw).to(inner.language_model.dtype)
        sizes = (image_grid_thw.prod(-1) // merge).tolist()
        return BaseModelOutputWithPooling(last_hidden_state=embeds, pooler_output=torch.split(embeds, sizes))

    inner.get_image_features = get_image_features  # instance attribute: model.forward calls this one
    return model
