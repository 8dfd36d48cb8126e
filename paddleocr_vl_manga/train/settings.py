"""train.sh's settings, checked before anything loads.

    python -m paddleocr_vl_manga.train.settings EPOCHS=3 LR=2e-5 ...   # every setting as train.sh holds it

One `error: NAME=VALUE: ...` line per bad value, saying what the setting accepts, and exit 2; one `warning:`
line per environment variable that looks like a setting but is not one (EPOCH=1, LEARNING_RATE=1e-5,
epochs=1), naming the setting it resembles; exit 0 otherwise. Standard library only and no torch import:
it answers in well under a second, where importing transformers takes 3-13 s on a 2-core machine.
The setting names are train.sh's own `NAME=${NAME:-default}` lines (tests/train/test_train_settings.py checks
that each has a check here).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

TRAIN_SH = Path(__file__).resolve().parents[2] / "train.sh"  # at the repository root: read, not imported
SETTING_LINE = re.compile(r"^([A-Z_][A-Z0-9_]*)=\$\{\1:-", re.M)  # as tools/write_docs.py reads them
YES, NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
LORA_TARGETS = ("language", "vision", "projector")  # model.lora.TARGET_GROUPS (which imports torch)
Check = tuple[Callable[[str], bool], str]  # (accepts the value?, what it accepts)


def setting_names(train_sh: Path = TRAIN_SH) -> list[str]:
    return SETTING_LINE.findall(train_sh.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- what each setting accepts


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _integer(v: str) -> int | None:
    return int(v) if re.fullmatch(r"[+-]?\d+", v.strip()) else None


def number(low: float, *, above: bool = True, below: float | None = None) -> Check:
    accepts = f"a number {'>' if above else '>='} {low:g}" + ("" if below is None else f" and < {below:g}")

    def ok(v: str) -> bool:
        x = _number(v)
        return x is not None and (x > low if above else x >= low) and (below is None or x < below)

    return ok, accepts


def integer(low: int, high: int | None = None) -> Check:
    accepts = f"a whole number >= {low}" + (f" and <= {high}" if high is not None else "")

    def ok(v: str) -> bool:
        x = _integer(v)
        return x is not None and x >= low and (high is None or x <= high)

    return ok, accepts


def one_of(*choices: str, hint: str = "") -> Check:
    return (lambda v: v in choices), "one of " + ", ".join(choices) + hint


def optional(check: Check, empty: str) -> Check:
    ok, accepts = check
    return (lambda v: v == "" or ok(v)), f"{accepts}, or unset for {empty}"


def yes_no(auto: bool = False) -> Check:
    words = ("auto",) * auto + YES + NO[1:]
    return (lambda v: v.lower() in words), "auto, " * auto + "/".join(YES) + " or " + "/".join(NO[1:])


def steps() -> Check:
    """A step interval as TrainingArguments takes it: a whole number >= 1, or a fraction of the run < 1."""
    def ok(v: str) -> bool:
        x = _number(v)
        return x is not None and (0 < x < 1 or (x >= 1 and x == int(x)))
    return ok, "a whole number of optimizer steps >= 1, or a fraction of all steps between 0 and 1"


def names_in_module(module: str, pattern: str) -> set[str] | None:
    """Names read from a transformers module's source, without importing it (that pulls in torch: seconds);
    None where the file or the names cannot be found, and the check is then left to transformers."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations)), *module.split(".")[1:]).with_suffix(".py")
        found = set(re.findall(pattern, path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ImportError):
        return None
    return found or None


def scheduler() -> Check:
    body = names_in_module("transformers.trainer_utils", r"class SchedulerType\b[\s\S]*?\n\n\n")
    names = sorted(set(re.findall(r'\n    [A-Z_]+ = "(\w+)"', "".join(body)))) if body else []
    if not names:
        return (lambda v: bool(re.fullmatch(r"\w+", v))), "a transformers lr_scheduler_type name"
    return one_of(*names, hint=" (transformers' lr_scheduler_type)")


def report_to() -> Check:
    block = names_in_module("transformers.integrations.integration_utils",
                            r"INTEGRATION_TO_CALLBACK = \{[^}]*\}")
    known = set(re.findall(r'"(\w+)":', "".join(block))) | {"all", "none"} if block else None
    words = ", ".join(sorted(known)) if known else "integration names"

    def ok(v: str) -> bool:
        names = [n.strip() for n in v.split(",")]
        return all(re.fullmatch(r"\w+", n) and (known is None or n in known) for n in names)

    return ok, f"comma-separated, from: {words}"


def lora_targets() -> Check:
    def ok(v: str) -> bool:
        return all(t.strip() in LORA_TARGETS for t in v.split(","))
    return ok, "comma-separated, from: " + ", ".join(LORA_TARGETS)


def resume(v: str) -> str | None:
    """What is wrong with a RESUME value (None: nothing). A path is checked here, not after the model has
    loaded (there the Trainer takes a missing folder for a hub repo id)."""
    if v in ("auto", "none"):
        return None
    how = "use auto, none or the path of a checkpoint-N folder (relative paths: from train.sh's folder)"
    if not Path(v).is_dir():
        return f"no such folder; {how}"
    if not (Path(v) / "trainer_state.json").is_file():
        return f"not a complete checkpoint (no trainer_state.json in it); {how}"
    return None


NON_EMPTY = (lambda v: v.strip() != ""), "a non-empty value"
CHECKS: dict[str, Check] = {
    "PYTHON": NON_EMPTY,
    "MODEL_PATH": NON_EMPTY,
    "DATA_DIR": NON_EMPTY,
    "OUTPUT_DIR": NON_EMPTY,
    "EPOCHS": number(0),
    "MAX_STEPS": optional(integer(1), "EPOCHS to decide"),
    "LORA_R": integer(0),
    "LORA_ALPHA": optional(number(0), "2 x LORA_R"),
    "LORA_DROPOUT": number(0, above=False, below=1),
    "LORA_TARGETS": lora_targets(),
    "LR": optional(number(0), "the default"),
    "SCHEDULER": scheduler(),
    "WARMUP": number(0, above=False),
    "WEIGHT_DECAY": number(0, above=False),
    "MAX_GRAD_NORM": number(0, above=False),
    "BATCH_SIZE": integer(1),
    "GRAD_ACCUM": integer(1),
    "MAX_LENGTH": integer(1),
    "PRECISION": one_of("auto", "fp32_master", "bf16_lean"),
    "BF16": yes_no(auto=True),
    "GRADIENT_CHECKPOINTING": yes_no(),
    "SAVE_STEPS": steps(),
    "SAVE_TOTAL_LIMIT": integer(1),
    "EVAL_STEPS": steps(),
    "EVAL_GENERATION_SAMPLES": integer(0),
    "LOGGING_STEPS": steps(),
    "NUM_WORKERS": integer(0),
    "SEED": integer(0, 2**32 - 1),  # numpy's seed range
    "NUM_GPUS": ((lambda v: v == "auto" or integer(1)[0](v)), "auto or a whole number of processes >= 1"),
    "NNODES": integer(1),
    "NODE_RANK": integer(0),
    "MASTER_ADDR": ((lambda v: v == "" or " " not in v), "a host name or address"),
    "MASTER_PORT": integer(1, 65535),
    "RDZV_ID": NON_EMPTY,
    "RESUME": ((lambda v: resume(v) is None), ""),  # its message says which
    "REPORT_TO": report_to(),
    "REHEARSE": yes_no(),
    "DRY_RUN": yes_no(),
}


def problems(values: dict[str, str]) -> list[str]:
    """One line per bad setting (and per bad combination), in train.sh's order."""
    out = []
    for name, value in values.items():
        ok, accepts = CHECKS[name]
        if not ok(value):
            why = resume(value) if name == "RESUME" else f"use {accepts}"
            out.append(f"{name}={value}: {why}")
    if out:
        return out
    if int(values.get("NODE_RANK", 0)) >= int(values.get("NNODES", 1)):
        out.append(f"NODE_RANK={values['NODE_RANK']}: use 0 to NNODES-1 ({int(values['NNODES']) - 1})")
    save, every = _number(values.get("SAVE_STEPS", "")), _number(values.get("EVAL_STEPS", ""))
    if save and every and save >= 1 and every >= 1 and save % every:
        # the best checkpoint by val CER is kept: every save must follow an evaluation
        out.append(f"EVAL_STEPS={values['EVAL_STEPS']}: use a divisor of SAVE_STEPS={values['SAVE_STEPS']}")
    return out


# ---------------------------------------------------------------- look-alikes in the environment

# Variables of the launchers, schedulers and libraries around a run: never a misspelt setting.
# (MODULE: Environment Modules and Lmod set MODULEPATH, 2 edits from MODEL_PATH, in jobs on most clusters;
# PET_: torchrun's own variables, set in every Kubeflow PyTorchJob pod: PET_NNODES, PET_NODE_RANK, ...)
FOREIGN_PREFIXES = ("PYTHON", "SLURM_", "PMI_", "PMIX_", "OMPI_", "PBS_", "CUDA_", "NCCL_", "TORCH", "HF_",
                    "XDG_", "LC_", "KMP_", "OMP_", "MKL_", "GIT_", "SSH_", "DEMO_", "MODULE", "LMOD_", "PET_")


def distance(a: str, b: str) -> int:
    """Edit distance with adjacent swaps (optimal string alignment): EPOHCS is 1 from EPOCHS."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def flag_aliases(train_sh: Path = TRAIN_SH) -> dict[str, str]:
    """LEARNING_RATE -> LR: the TrainingArguments name of each flag a setting feeds, upper-cased."""
    pairs = re.findall(r'--(\w+) "\$(\w+)"', train_sh.read_text(encoding="utf-8"))
    return {flag.upper(): name for flag, name in pairs if flag.upper() != name}


def look_alike(name: str, settings: list[str], aliases: dict[str, str], known: set[str]) -> str | None:
    """The setting an environment variable seems meant for, or None."""
    if name in known or name.startswith(FOREIGN_PREFIXES):
        return None
    upper = name.upper()
    if upper in settings:  # epochs=1
        return upper
    if upper in aliases:  # LEARNING_RATE=1e-5
        return aliases[upper]
    best = min(settings, key=lambda s: (distance(upper, s), s))
    if distance(upper, best) <= (1 if len(best) <= 4 else 2):  # EPOCH, BATCHSIZE, GRAD_ACCUMM
        return best
    # a truncation (GRAD for GRAD_ACCUM, MAX_LEN; four letters only as a whole word: MODE and REPO are common
    # variables of their own), or a setting with a qualifier (WARMUP_RATIO, NUM_EPOCHS)
    for s in settings:
        if len(upper) >= 4 and s.startswith(upper) and (len(upper) > 4 or s[4] == "_"):
            return s
        if upper.startswith(s + "_") or upper.endswith("_" + s):
            return s
    return None


def look_alikes(environ: dict[str, str], settings: list[str], train_sh: Path = TRAIN_SH) -> list[str]:
    text = train_sh.read_text(encoding="utf-8")
    known = set(settings) | set(re.findall(r"\$\{?!?([A-Za-z_][A-Za-z0-9_]*)", text))  # all train.sh reads
    aliases = flag_aliases(train_sh)
    out = []
    for name in sorted(environ):
        meant = look_alike(name, settings, aliases, known)
        if meant:
            out.append(f"{name}={environ[name]} is not a train.sh setting and is ignored; did you mean "
                       f"{meant}? (settings: docs/training.md#trainsh-settings)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = setting_names()
    values = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = [n for n in values if n not in CHECKS] + [a for a in argv if "=" not in a]
    if unknown:
        print(f"error: train/settings.py: no check for {', '.join(unknown)} (usage: NAME=VALUE ...)",
              file=sys.stderr)
        return 2
    for line in look_alikes(dict(os.environ), settings):
        print(f"warning: {line}", file=sys.stderr)
    bad = problems(values)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
