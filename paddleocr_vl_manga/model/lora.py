"""Low-rank adapters (LoRA, through PEFT) for PaddleOCR-VL: which layers get them, loading them back from a
checkpoint, and merging them into a plain model.

Training with --lora_r R freezes the 0.9B base and trains R x (in + out) numbers per targeted projection:
the base's weights need no gradients or AdamW state, which is what brings fine-tuning under 8 GB. The run's
final output is the merged model (W + B A * alpha / R in every targeted layer), so everything that loads the
base loads it; the adapter is kept beside it in ``adapter/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Module names as transformers 5 builds PaddleOCR-VL (checked against the model at run time: a group that
# matches no layer is an error, not a silently untrained run).
TARGET_GROUPS: dict[str, str] = {
    # ERNIE-4.5 decoder: attention and SwiGLU MLP projections
    "language": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    # SigLIP-style vision encoder
    "vision": r"model\.visual\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
    # the MLP that maps merged image patches into the decoder's space
    "projector": r"model\.projector\.linear_[12]",
}
ADAPTER_DIR = "adapter"
DEFAULT_DROPOUT = 0.05  # on the adapters' input; alpha defaults to 2 r (add_lora)


class LoraError(ValueError):
    """Bad LoRA settings for this model (printed as one `error: ...` line)."""


def parse_targets(targets: str) -> list[str]:
    """'language,vision' -> ['language', 'vision'] (order kept, duplicates dropped)."""
    groups = list(dict.fromkeys(t.strip() for t in targets.replace(" ", ",").split(",") if t.strip()))
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown or not groups:
        raise LoraError(
            f"--lora_targets {targets!r}: choose one or more of {', '.join(TARGET_GROUPS)} (comma-separated)"
        )
    return groups


def target_pattern(targets: str) -> str:
    """The regex PEFT full-matches against module names."""
    return "|".join(f"(?:{TARGET_GROUPS[g]})" for g in parse_targets(targets))


def target_linears(model: torch.nn.Module, targets: str) -> dict[str, torch.nn.Linear]:
    """The nn.Linear layers that get an adapter, by name; every group must match at least one."""
    found: dict[str, torch.nn.Linear] = {}
    for group in parse_targets(targets):
        pattern = re.compile(TARGET_GROUPS[group])
        hits = {
            n: m for n, m in model.named_modules() if pattern.fullmatch(n) and isinstance(m, torch.nn.Linear)
        }
        if not hits:
            raise LoraError(
                f"LoRA target group {group!r} matches no linear layer of {type(model).__name__} "
                f"(pattern {TARGET_GROUPS[group]}); this transformers version names its modules differently"
            )
        found |= hits
    return found


def lora_parameter_count(model: torch.nn.Module, r: int, targets: str) -> int:
    """Trainable numbers of an r-rank adapter on `targets` (works on a meta-device model)."""
    return sum(r * (m.in_features + m.out_features) for m in target_linears(model, targets).values())


def add_lora(
    model: Any, r: int, targets: str, *, alpha: float | None = None, dropout: float = DEFAULT_DROPOUT
) -> Any:
    """Wrap `model` in a PeftModel whose only trainable tensors are the adapters (kept in fp32 even on a bf16
    base, so that their small updates are not rounded away). alpha: default 2 r."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise LoraError(f"--lora_r must be >= 1 to train adapters (got {r}; 0 means full fine-tuning)")
    target_linears(model, targets)  # fail with our message before PEFT's
    config = LoraConfig(
        r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=target_pattern(targets),
        bias="none",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_adapter_weights(model: Any, checkpoint: str | Path) -> None:
    """Put the adapter saved in `checkpoint` into the PeftModel `model` (resume, best-model load). Strict:
    the saved adapter must have this run's settings, and every adapter tensor must come from the file."""
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        saved = PeftConfig.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        raise LoraError(f"{checkpoint} holds no LoRA adapter ({e}); was it saved by a full fine-tune?") from e
    mine = model.peft_config["default"]
    keys = ("r", "lora_alpha", "target_modules")
    differ = [f"{k} {getattr(saved, k, None)!r} there, {getattr(mine, k)!r} now" for k in keys
              if getattr(saved, k, None) != getattr(mine, k)]
    if differ:
        raise LoraError(
            f"adapter in {checkpoint} does not fit this model: {'; '.join(differ)} (keep --lora_r, "
            "--lora_alpha and --lora_targets of the run that saved it)"
        )
    result = set_peft_model_state_dict(model, load_peft_weights(str(checkpoint), device="cpu"))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n in result.missing_keys if n in wanted)
    if missing or result.unexpected_keys:
        raise LoraError(
            f"adapter in {checkpoint} does not fit this model: {len(missing)} adapter tensors missing "
            f"(e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {list(result.unexpected_keys)[:2]})"
        )


@torch.no_grad()
def merge_lora(model: Any) -> Any:
    """The plain transformers model with W + B A * scaling in every adapted layer, merged in fp32 (a bf16
    base is upcast first, so the merged weight is rounded once, when it is saved in the base's dtype).
    Consumes `model`: its layers are modified in place."""
    model.float()
    return model.merge_and_unload()
