"""How much GPU memory a training run needs, per mode, planned before any weight is loaded.

    rows = memory_plan(config, batch_size=1, seq_len=230, image_tokens=188, gradient_checkpointing=True,
                       bf16_autocast=True, lora_r=0, lora_targets="language", lora_precision="bf16_lean")
    print(format_plan(rows, "bf16_lean", gpu_memory_bytes()))

Exact parts (parameter counts of the model built on the meta device, so nothing is read or allocated;
tests/train/test_memory_plan.py checks them against a real step of each mode), in bytes per parameter:
  fp32_master  weights 4, gradients 4, torch AdamW exp_avg + exp_avg_sq 8; under bf16 autocast the bf16 copy
               of every Linear/Conv2d weight and bias stays in autocast's cache through the step: 2.
  bf16_lean    weights 2, gradients 2, optimi AdamW(kahan_sum=True): exp_avg, exp_avg_sq and kahan_comp, in
               bf16: 6.
  lora         the frozen base in the precision's dtype (4 or 2; no gradient, no optimizer state); adapters,
               r x (in + out) per targeted Linear, in fp32: weights 4, gradients 4, torch AdamW 8, cached
               bf16 copies 2. On an fp32 base autocast also casts every frozen Linear weight on the
               gradient's path, and backward keeps those copies (with checkpointing: lm_head's, the
               projector's, once per image, and one recomputed layer's).
Optimizer `step` counters (a 0-d tensor per parameter tensor, torch AdamW only) are left out.

Activations are an ESTIMATE until measured on a GPU: the tensors autograd keeps for backward, plus two
transients. benchmarks/bench_memory_plan.py checks the kept part on the CPU against what autograd really
keeps (bf16 autocast with CUDA's fp32 layer_norm and bool dropout masks mimicked): within 0.1 % on the tiny
and the full-size model, every mode, batch 1-2, 200-350 image tokens, checkpointing on and off. A GPU's
attention kernels may keep slightly different extras, and the transients are not measured.
Counted per decoder token (B x seq_len: padding counts), per vision patch (B x image_tokens x
spatial_merge_size**2: the encoder runs before the 2x2 merge) and per logit. c: bytes of the compute dtype
(2 under bf16 autocast, else the weights'); w: of the weights (the decoder's residual stream keeps their
dtype); h, d: decoder/vision width; I, J: their MLP widths; e: query heads x head_dim; k: key/value heads x
head_dim (x heads / kv_heads for B > 1: with a padding mask SDPA gets repeated key/value heads); n: heads.
  decoder layer, per token  2 (4h + 4 + wh)    RMSNorms: fp32 input, rsqrt, normalized input
                            + c (2e + 2k) + 4n SDPA: q, k, v, output, fp32 logsumexp
                            + 3cI              gate, silu(gate), up
                            + c (q + g) h + cI Linear inputs: q = g = 1 (one shared bf16 copy) when w = c,
                                               else q/k/v and gate/up cast apart (q = 3, g = 2); down_proj's
                 and B > 1: + c B seq_len**2   the additive padding mask SDPA makes from the boolean one
  vision layer, per patch   2 (4d + 8)         LayerNorms, which autocast runs in fp32: input, mean, rstd
                            + 4cd + 4n + cJ    SDPA q, k, v, output, logsumexp; fc1's output
                            + 5cd + cJ         Linear inputs: q, k, v and fc1 cast apart from the fp32 norm
                                               output, out_proj's; fc2's
  per patch                 588c + 48 + 2 (4d + 8) + 8d/n   pixels, position interpolation, post- and
                                               projector LayerNorm, rotary cos/sin
  per merged token          3 x 4cd            projector: GELU input, the two Linear inputs
  per token                 4h + 4 + wh + 2w e/n   final norm, rotary cos/sin
  per logit row x position  ch + 4V + 8, and 8V transient   lm_head input, log_softmax output, target; the
                                               bf16 logits and their fp32 copy in forward, the loss
                                               gradients in backward
answer_loss computes logits only where some row's next token is an answer token; unless told, the plan takes
min(seq_len, B x (seq_len - image_tokens)) such positions per row: the text tokens of the longest sample
(its answer and the ~10 prompt tokens) with no two rows' answers at the same positions, the worst case.
Gradient checkpointing keeps each layer's inputs instead (wh per token, cd per patch, one boolean mask) and
recomputes one layer at a time in backward: the larger layer's saved tensors are added once, as a transient.
LoRA: a frozen Linear saves no input; each adapter saves its own bf16 copy of its input (c per input
element; fp32 without autocast), its dropout mask (1 byte per element when lora_dropout > 0) and the rank-r
activation; frozen norms do not save their output; parts before the first one with adapters (vision, then
projector, then language) run without a graph and save nothing, and the first adapted layer's norm and
dropout masks neither, as their input needs no gradient.
Not counted: the CUDA context (~0.3-0.5 GiB), allocator fragmentation, the gradients of activations in
backward (a few tensors of one layer at a time), and that in backward gradients grow while activations
shrink (the sum here bounds that peak from above).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from paddleocr_vl_manga.model.lora import DEFAULT_DROPOUT, lora_parameter_count, parse_targets, target_linears

GIB = 2**30
# Where each part of PaddleOCR-VL lives (transformers 5 module names) and in which order the gradient meets
# them: a LoRA run saves activations only from the first part that holds adapters onwards.
PARTS = {"vision": "model.visual.", "projector": "model.projector.", "language": "model.language_model."}
LAYERS = {"vision": "model.visual.vision_model.encoder.layers.", "language": "model.language_model.layers."}


@dataclass
class PlanRow:
    mode: str  # fp32_master | bf16_lean | lora
    label: str
    weights: int  # bytes
    gradients: int
    optimizer: int
    autocast_copies: int
    activations: int
    assumptions: str = ""  # the batch the activations are planned for (format_plan's header)
    batch_size: int = 1
    gradient_checkpointing: bool = False
    activation_parts: dict[str, int] = field(default_factory=dict)  # activation_bytes' breakdown

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.autocast_copies + self.activations


class GpuMemory(NamedTuple):
    free: int  # bytes
    total: int


def gpu_memory_bytes() -> GpuMemory | None:
    """Free and total memory of the visible CUDA device (the current one), None without one. The plan is held
    against free memory: a desktop card's display, or another process, already holds part of the total."""
    if not torch.cuda.is_available():
        return None
    return GpuMemory(*torch.cuda.mem_get_info())


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return AutoModelForImageTextToText.from_config(copy.deepcopy(config))  # from_config may set fields


def _numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())  # tied tensors once


def _cast_params(model: torch.nn.Module, prefix: str = "", *, frozen: bool = False) -> int:
    """Parameters under `prefix` that bf16 autocast casts: those of Linear and Conv2d layers. For a frozen
    base only Linear weights: a bias's or the patch embedding's copy is not kept for backward."""
    kinds = torch.nn.Linear if frozen else (torch.nn.Linear, torch.nn.Conv2d)
    mods = [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, kinds)]
    return _numel(m.weight for m in mods) if frozen else _numel(p for m in mods for p in m.parameters())


def activation_bytes(
    config,
    *,
    batch_size: int,
    seq_len: int,
    image_tokens: int,
    gradient_checkpointing: bool,
    bf16_autocast: bool,
    weight_bytes: int,
    lora: dict[str, tuple[int, int]] | None = None,
    lora_dropout: float = DEFAULT_DROPOUT,
    logit_positions: int | None = None,
) -> dict[str, int]:
    """Activation estimate per part (vision, projector, decoder, logits: saved for backward; transient: the
    logits peak and, with checkpointing, the recomputed layer), by the module docstring's formula.

    lora: None for full fine-tuning, else {part: (sum of in_features, sum of r) over its adapted Linears}
    for every part from the first adapted one on (a part present with (0, 0) passes the gradient only)."""
    tc, vc = config.text_config, config.vision_config
    w, c = weight_bytes, 2 if bf16_autocast else weight_bytes  # weights, compute dtype
    ln = 4 if bf16_autocast else c  # autocast runs LayerNorm in fp32
    cl, drop = (2 if bf16_autocast else 4), (1 if lora_dropout > 0 else 0)  # adapters: fp32 weights
    h, it, n = tc.hidden_size, tc.intermediate_size, tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or h // n
    kv = (n if batch_size > 1 else tc.num_key_value_heads) * head_dim
    d, iv, nv = vc.hidden_size, vc.intermediate_size, vc.num_attention_heads
    merge = vc.spatial_merge_size**2
    tokens, merged = batch_size * seq_len, batch_size * image_tokens
    patches = merged * merge
    full = lora is None
    grad = {p: full or p in lora for p in PARTS}  # does the gradient flow through this part?
    first = None if full else next(iter(lora))  # the first part with adapters

    def linear_inputs(part: str, trained: int) -> int:  # `trained`: full fine-tuning's, else the adapters'
        if full:
            return trained
        ins, rs = lora.get(part, (0, 0))
        return (cl + drop) * ins + cl * rs

    qkv, gu = (1, 1) if w == c else (3, 2)
    dec_layer = (2 * (4 * h + 4 + (w * h if full else 0)) + c * (2 * n * head_dim + 2 * kv) + 4 * n
                 + 3 * c * it + linear_inputs("language", c * (qkv + gu) * h + c * it))
    vis_layer = (2 * (ln * d + 8) + 4 * c * d + 4 * nv + c * iv
                 + linear_inputs("vision", (5 if bf16_autocast else 3) * c * d + c * iv))
    # B > 1: SDPA turns the boolean padding mask (B x S x S) into an additive one in each layer, and keeps it
    mask = (batch_size > 1) * batch_size * seq_len**2
    if gradient_checkpointing:  # each layer keeps its inputs (one mask for all); one is recomputed at a time
        vision = grad["vision"] * patches * vc.num_hidden_layers * c * d
        decoder = grad["language"] * (tokens * tc.num_hidden_layers * w * h + mask)
        recompute = max(grad["vision"] * patches * vis_layer,
                        grad["language"] * (tokens * dec_layer + c * mask))
    else:
        vision = grad["vision"] * patches * vc.num_hidden_layers * vis_layer
        decoder = grad["language"] * tc.num_hidden_layers * (tokens * dec_layer + c * mask)
        recompute = 0
        # the first adapted layer's input needs no gradient: its norm and q/k/v adapters' dropout save nothing
        vision -= patches * (ln * d + 8 + 3 * drop * d) if first == "vision" else 0
        decoder -= tokens * (4 * h + 4 + 3 * drop * h) if first == "language" else 0
    # patch embedding input, position interpolation (trained only); post-LayerNorm, rotary cos and sin
    vision += patches * (full * (3 * vc.patch_size**2 * c + 48) + grad["vision"] * (ln * d + 8 + 8 * d // nv))
    # final norm, rotary cos and sin
    decoder += tokens * (4 * h + 4 + (w * h if full else 0) + 2 * w * head_dim)
    # projector, per merged token: its LayerNorm (if the gradient goes on into vision), GELU input, Linears;
    # linear_1's adapter saves no dropout mask when vision is frozen (its input needs no gradient)
    no_mask = drop * 4 * d if first == "projector" else 0
    projector = grad["projector"] * merged * (grad["vision"] * merge * (ln * d + 8) + c * 4 * d
                                              + linear_inputs("projector", 2 * c * 4 * d) - no_mask)
    keep = logit_positions or min(seq_len, batch_size * max(1, seq_len - image_tokens))
    vocab = tc.vocab_size
    # lm_head input (trained), log_softmax output, int64 targets and positions
    logits = batch_size * keep * ((c * h if full else 0) + 4 * vocab + 8) + 8 * keep
    transient = batch_size * keep * 8 * vocab + recompute
    return {"vision": vision, "projector": projector, "decoder": decoder, "logits": logits,
            "transient": transient}


def memory_plan(
    config,
    *,
    batch_size: int,
    seq_len: int,
    image_tokens: int,
    gradient_checkpointing: bool,
    bf16_autocast: bool,
    lora_r: int,
    lora_targets: str,
    lora_precision: str,
    lora_dropout: float = DEFAULT_DROPOUT,
    logit_positions: int | None = None,
) -> list[PlanRow]:
    """One PlanRow per mode (fp32_master, bf16_lean, lora) for micro-batches of `batch_size` samples of
    `seq_len` decoder tokens, `image_tokens` of them image tokens (see the module docstring).

    The lora row uses rank lora_r (16 if 0) on lora_targets, with a base in lora_precision's dtype."""
    model = _meta_model(config)
    params = _numel(model.parameters())
    linear = _cast_params(model)
    r = lora_r or 16
    groups = parse_targets(lora_targets)
    adapters = lora_parameter_count(model, r, lora_targets)
    common = {"batch_size": batch_size, "seq_len": seq_len, "image_tokens": image_tokens,
              "gradient_checkpointing": gradient_checkpointing, "bf16_autocast": bf16_autocast,
              "logit_positions": logit_positions}
    cast = 2 if bf16_autocast else 0  # bytes of a bf16 copy of an fp32 tensor, when autocast makes one

    def row(mode: str, label: str, w: int, g: int, o: int, copies: int, act: dict[str, int]) -> PlanRow:
        return PlanRow(mode, label, w, g, o, copies, sum(act.values()), assumptions,
                       batch_size, gradient_checkpointing, act)

    vc = config.vision_config
    assumptions = (
        f"batch {batch_size} x {seq_len} tokens ({image_tokens} image tokens = "
        f"{image_tokens * vc.spatial_merge_size**2} patches per sample), gradient checkpointing "
        f"{'on' if gradient_checkpointing else 'off'}, bf16 autocast {'on' if bf16_autocast else 'off'}"
    )
    rows = [
        row("fp32_master", "fp32 weights, torch AdamW", 4 * params, 4 * params, 8 * params,
            cast * linear, activation_bytes(config, weight_bytes=4, **common)),
        row("bf16_lean", "bf16 weights, Kahan-summed AdamW", 2 * params, 2 * params, 6 * params, 0,
            activation_bytes(config, weight_bytes=2, **common)),
    ]

    # LoRA: the gradient flows from the first part that holds adapters on; each part's adapter widths
    passed = list(PARTS)[min(list(PARTS).index(g) for g in groups):]
    lora = dict.fromkeys(passed, (0, 0))
    for name, m in target_linears(model, lora_targets).items():
        part = next(p for p, prefix in PARTS.items() if name.startswith(prefix))
        lora[part] = (lora[part][0] + m.in_features, lora[part][1] + r)
    per_layer = {p: _layers(config, p) for p in passed}  # activation_bytes counts one layer's adapters
    lora = {p: (ins // per_layer[p], rs // per_layer[p]) for p, (ins, rs) in lora.items()}
    base_w = 4 if lora_precision == "fp32_master" else 2
    copies = cast * adapters
    if cast and base_w == 4:  # frozen fp32 Linears the gradient flows through keep their bf16 copy
        copies += cast * _cast_params(model, "lm_head", frozen=True)
        if "projector" in passed:  # once per image; linear_1 needs no input gradient when vision is frozen
            prefix = PARTS["projector"] + ("" if "vision" in passed else "linear_2")
            copies += cast * batch_size * _cast_params(model, prefix, frozen=True)
        layers = [_cast_params(model, f"{LAYERS[p]}{i}.", frozen=True) for p in passed if p in LAYERS
                  for i in range(_layers(config, p) if not gradient_checkpointing else 1)]
        copies += cast * (max(layers) if gradient_checkpointing else sum(layers))  # recomputed one by one
    rows.append(row(
        "lora", f"LoRA r{r} on {','.join(groups)}, {'fp32' if base_w == 4 else 'bf16'} base",
        base_w * params + 4 * adapters, 4 * adapters, 8 * adapters, copies,
        activation_bytes(config, weight_bytes=base_w, lora=lora, lora_dropout=lora_dropout, **common),
    ))
    return rows


def _layers(config, part: str) -> int:
    sub = {"vision": config.vision_config, "language": config.text_config}.get(part)
    return sub.num_hidden_layers if sub is not None else 1


def format_plan(rows: list[PlanRow], chosen: str, gpu: GpuMemory | None) -> str:
    """A fixed-width table in GiB (the chosen mode marked '>') and whether it fits the visible GPU's free
    memory."""
    widths = (7, 6, 6, 8, 6, 6)
    names = ("weights", "grads", "optim", "autocast", "activ", "total")
    header = " ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines = ["memory plan, GiB (activations: an estimate until measured on a GPU)",
             f"  for {rows[0].assumptions}", f"  {'mode':<52} {header}"]
    for r in rows:
        cells = (r.weights, r.gradients, r.optimizer, r.autocast_copies, r.activations, r.total)
        lines.append(f"{'>' if r.mode == chosen else ' '} {f'{r.mode} ({r.label})':<52} "
                     + " ".join(f"{v / GIB:>{w}.2f}" for v, w in zip(cells, widths, strict=True)))
    mine = next(r for r in rows if r.mode == chosen)
    need = f"{chosen} needs ~{mine.total / GIB:.1f} GiB"
    if gpu is None:
        lines.append(f"no CUDA device visible: {need} on a GPU")
        return "\n".join(lines)
    free = f"the visible GPU's free memory, {gpu.free / GIB:.1f} of {gpu.total / GIB:.1f} GiB"
    if mine.total > gpu.free:
        fits = ", ".join(f"{r.mode} ({r.total / GIB:.1f} GiB)" for r in rows if r.total <= gpu.free)
        tries = " or ".join(filter(None, [
            "a smaller --per_device_train_batch_size" if mine.batch_size > 1 else "",
            "" if mine.gradient_checkpointing else "--gradient_checkpointing true"]))
        hint = "; or ".join(filter(None, [fits and f"{fits} would fit", tries and f"try {tries}"]))
        lines.append(f"warning: {need}, which exceeds {free} (activations: {mine.activations / GIB:.1f} GiB "
                     "of it)" + (f"; {hint}" if hint else ""))
    else:  # free is measured with this process's CUDA context already in place
        lines.append(f"{need}: fits {free} (plus the allocator's slack)")
    return "\n".join(lines)


# The docs' memory table (docs/lora-and-memory.md, written by tools/write_docs.py): the 0.9B architecture
# (PaddleOCRVLConfig defaults, the release's untied lm_head) on
# a typical crop (a 120x380 vertical line: 200 image tokens, 230 tokens in all), bf16 autocast, checkpointing.
README_MARKERS = ("<!-- memory-plan -->", "<!-- /memory-plan -->")


def readme_table(seq_len: int = 230, image_tokens: int = 200) -> str:
    from transformers import PaddleOCRVLConfig

    config = PaddleOCRVLConfig(text_config={"tie_word_embeddings": False}, tie_word_embeddings=False)
    lines = ["| mode | batch | weights | gradients | optimizer | autocast copies | activations (est.) "
             "| total |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in (1, 8):
        for targets in ("language", "language,vision"):
            rows = memory_plan(config, batch_size=batch, seq_len=seq_len, image_tokens=image_tokens,
                               gradient_checkpointing=True, bf16_autocast=True, lora_r=16,
                               lora_targets=targets, lora_precision="bf16_lean")
            for r in rows if targets == "language" else rows[2:]:
                cells = (r.weights, r.gradients, r.optimizer, r.autocast_copies, r.activations, r.total)
                lines.append(f"| `{r.mode}`: {r.label} | {batch} | "
                             + " | ".join(f"{b / GIB:.2f}" for b in cells) + " |")
    note = (f"Plan (GiB), not a measurement: `python tools/write_docs.py` for the 0.9B architecture, a "
            f"crop of {image_tokens} image tokens ({seq_len} tokens in all), bf16 autocast, gradient "
            "checkpointing; the CUDA context (~0.3-0.5 GiB) and allocator fragmentation come on top.")
    return f"{README_MARKERS[0]}\n{note}\n\n" + "\n".join(lines) + f"\n{README_MARKERS[1]}"


# python -m paddleocr_vl_manga.train.memory_plan FILE.md: rewrite the table between the markers
if __name__ == "__main__":
    import re
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/lora-and-memory.md")
    text = path.read_text(encoding="utf-8")
    pattern = re.escape(README_MARKERS[0]) + ".*?" + re.escape(README_MARKERS[1])
    if not re.search(pattern, text, flags=re.S):
        sys.exit(f"error: {path} has no {README_MARKERS[0]} ... {README_MARKERS[1]} markers")
    path.write_text(re.sub(pattern, lambda _: readme_table(), text, count=1, flags=re.S), encoding="utf-8")
