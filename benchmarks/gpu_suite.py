"""Every GPU figure README needs, in one run that fits one device-tool call. Start it with gpu_suite.sh.

    bash benchmarks/gpu_suite.sh OUT_DIR          # GPU: full-size model, <= 6 min on one H200 (360 s budget)
    bash benchmarks/gpu_suite.sh OUT_DIR --smoke  # CPU: tiny model, tens of seconds (tests/benchmarks/)
    bash benchmarks/gpu_suite.sh OUT_DIR --only train_12gb eval --budget_s 300
    bash benchmarks/gpu_suite.sh OUT_DIR --preflight  # here, before every GPU run: the image's twin (README)

Before any part: every need of requirements.txt and of the carried wheels is checked against the installed
versions (environment(); one unmet need stops the suite, exit 2, each named), then gpu_fixtures.py builds the
data (and, --smoke, the tiny model) that every part reads: built once, not per part.

Parts (PARTS below; add a row to add one) run one after another, each in its own process: bench_train.py
--check_loss for groups of recipes under one memory cap, and bench_eval.py (seed loop vs batched generation,
texts compared). OUT_DIR gets results.json and results.md, both rewritten after every part, and suite.log
(gpu_suite.sh); three files, as the device tool brings back at most eight.

Time. The budget (--budget_s) counts from GPU_SUITE_T0, which gpu_suite.sh sets before it installs the
carried wheels, so set-up, the fixtures and model builds are all inside it; results.json's stages_s has the
seconds of each. What is left once set-up is
done is cut into one slot per part, in proportion to the part's share (its planned seconds on an H200); a part
that ends early hands what it did not use to the next one, and no part can eat into a later part's slot:
  - a part whose slot is shorter than its minimum (min_s) is skipped, and says so;
  - the bench script gets --deadline = slot end - grace: bench_train starts no recipe after it and stops
    timing a recipe at the first step that ends after it; bench_eval stops its seed loop there;
  - at the slot's end the part's whole process group is killed (SIGTERM, then SIGKILL): rows it finished are
    kept (bench_train rewrites its JSON after every recipe), the rest are reported as cut;
  - a part that fails or is killed never stops the next one.
A part whose recipe bench_train.py doesn't have is skipped as "not available" before the slots are cut, so
its share goes to the others.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from packaging.markers import default_environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_carry import REQUIREMENTS, read_requirements, unmet  # noqa: E402
from benchmarks.gpu_fixtures import build as build_fixtures  # noqa: E402
from benchmarks.gpu_tables import num, render_markdown  # noqa: E402


@dataclass
class Part:
    name: str
    kind: str  # "train" (bench_train.py) | "eval" (bench_eval.py)
    share: float  # planned seconds on one H200, build and data included; slots are scaled to the time left
    min_s: float  # a shorter slot could not finish one row: skip the part instead
    recipes: list[str] = field(default_factory=list)  # train: bench_train.py recipes, run in this order
    memory_cap_gb: float | None = None
    script: str = ""  # default: bench_<kind>.py beside this file (tests point it elsewhere)


# The parts, in the order they run: name, kind, memory cap (GiB), bench_train.py recipes, share (s), minimum
# slot (s). To add one, add a row. The shares are estimates until a GPU run: each part's seconds in results.md
# are what to tune them by; their sum stays within the budget less set-up (tests/benchmarks/).
# The seed
# and ours at the 12 GB cap come first (the ratio's reference, and the choice for cards under 20 GB). The data
# holds a 1529-token crop, and by the memory plan only batch 2 of ours holds it under 11 GiB (10.5 GiB
# planned; `default`'s 8 x 2: 23.5, so it is timed last, to show where it stops), with its rope=0 twin right
# after it:
# the same training with the rope position ids left to the model's forward (per-sample host syncs) instead of
# the collator, so the first run shows what that costs. Uncapped, by the plan on an 80 GB card:
# default:bs=16 48 GiB, default_nogc:bs=4 44, default_nogc (8 x 2) 84 (at the edge; 16 x 1 would be 170).
# LoRA at the 8 GiB cap last.
# The "12 GB" cap is what an RTX 3060 can allocate: it reports 11.76 GiB, and its CUDA context and the
# display take another 0.3-0.5 GiB, so 11 GiB (bench_train caps the allocator; the H100's context is apart).
CAP_12GB_CARD = 11
PARTS = [
    ("train_12gb", "train", CAP_12GB_CARD,
     ["seed", "default:bs=2,ga=8", "default:bs=2,ga=8,rope=0", "default"], 100, 50),
    ("train_uncapped", "train", None,
     ["default:bs=16,ga=1", "default_nogc:bs=4,ga=4", "default_nogc"], 70, 40),
    ("fp32_master", "train", None, ["fp32_master:bs=16,ga=1"], 35, 30),
    ("eval", "eval", None, [], 65, 50),  # 128 one-crop generate() calls of 16 tokens: the seed loop is slow
    ("lora_8gb", "train", 8, ["lora", "lora_vision"], 40, 35),
]
ORDER = [row[0] for row in PARTS]

# Same parts and recipes in both modes; only sizes differ. Every part reads the crops (and, smoke, the tiny
# model) that gpu_fixtures.py builds once per suite: GPU 2 synthetic books x 8 pages (171 crops, long ones
# included), smoke 1 x 3. GPU: 10 timed steps of 16 crops after 2 warm-up steps; eval 128 crops.
TRAIN_ARGS = {"gpu": ["--config", "full", "--steps", "10", "--warmup", "2", "--check_loss"],
              "smoke": ["--config", "tiny", "--steps", "1", "--warmup", "0", "--check_loss"]}
EVAL_ARGS = {"gpu": ["--model", "full", "--num_samples", "128", "--repeats", "1", "--batch_size", "16",
                     "--max_new_tokens", "16"],
             "smoke": ["--model", "tiny", "--num_samples", "8", "--repeats", "1", "--max_new_tokens", "4"]}
BUDGET_S = {"gpu": 360.0, "smoke": 300.0}  # GPU: 6 minutes, the device time an issue's run may take
# planned before the first part: the carried wheels (~5 s), the need check, the fixtures (16 s on a loaded
# 2-core VM, most of it drawing pages with 2 processes)
SETUP_S = {"gpu": 40.0, "smoke": 20.0}
GRACE_S = {"gpu": 20.0, "smoke": 10.0}  # --deadline this long before the slot ends: the last step, the JSON
RESERVE_S = 10.0  # kept back at the end: the last kill, results files, the shell's exit
KILL_WAIT_S = 5.0  # SIGTERM -> SIGKILL


def suite_parts(mode: str) -> list[Part]:
    """PARTS as Part objects; --smoke keeps the shares (so slots are proportional) with 5 s minimums."""
    return [Part(name, kind, share, min_s if mode == "gpu" else 5, recipes, cap)
            for name, kind, cap, recipes, share, min_s in PARTS]


def planned_s(parts: list[Part], mode: str) -> float:
    """The suite's planned seconds: set-up, every part's share, the reserve at the end."""
    return SETUP_S[mode] + sum(p.share for p in parts) + RESERVE_S


def bench_train_recipes() -> set[str]:
    """bench_train.PRESETS' keys, read from its source: an import would cost this process torch's."""
    tree = ast.parse((ROOT / "benchmarks" / "bench_train.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "PRESETS" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


def environment(requirements: Path | None = None) -> tuple[dict[str, str | None], list[str]]:
    """(versions, unmet needs), from package metadata alone (no torch import).

    Checks requirements.txt and the needs of every wheel that gpu_suite.sh installed from .whl/
    (GPU_SUITE_SITE): each one whose installed version (importlib.metadata, the carried copy first) is missing
    or outside its spec is one line of the second list. The image's own packages' needs are the image's
    business (its torch pins its CUDA libraries, ...), and gpu_carry.LEFT_OUT (wordfreq) is not checked: the
    suite does without it.
    """
    reqs = read_requirements(requirements or REQUIREMENTS)

    def version_of(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    requires_of: dict[str, list[str]] = {}
    if site := os.environ.get("GPU_SUITE_SITE"):
        for dist in metadata.distributions(path=[site]):
            requires_of[dist.metadata["Name"]] = dist.requires or []
    bad = unmet(reqs, version_of, requires_of, default_environment() | {"extra": ""})
    versions = {r.name: version_of(r.name) for r in reqs}
    for name in ("torchvision", "huggingface-hub", "tokenizers"):  # they change which code paths run
        versions[name] = version_of(name)
    return versions, bad


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command(part: Part, mode: str, fixtures: dict | None = None) -> list[str]:
    script = Path(part.script) if part.script else ROOT / "benchmarks" / f"bench_{part.kind}.py"
    shared = []
    if fixtures:
        shared = ["--data_dir", fixtures["data_dir"]]
        shared += ["--tiny_dir", fixtures["tiny_dir"]] if fixtures.get("tiny_dir") else []
    if part.kind == "eval":
        return [sys.executable, "-u", str(script), *EVAL_ARGS[mode], *shared]
    cap = ["--memory_cap_gb", f"{part.memory_cap_gb:g}"] if part.memory_cap_gb else []
    return [sys.executable, "-u", str(script), *TRAIN_ARGS[mode], *cap, *shared, "--recipe", *part.recipes]


def _pump(stream: IO[str], tail: deque) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n")[-300:])


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group (loader workers included), SIGKILL what is left after KILL_WAIT_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_WAIT_S)
            if sig == signal.SIGTERM:  # the leader is gone; its workers may not be
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_part(cmd: list[str], end: float, env: dict[str, str]) -> tuple[int | None, bool, list[str]]:
    """Run cmd in its own process group until it exits or `end` (Unix time). -> (returncode, killed, tail)."""
    tail: deque = deque(maxlen=30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, cwd=ROOT, start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=max(end - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        killed = True
    _kill_group(proc)  # also after a clean exit: DataLoader workers must not outlive their part
    reader.join(timeout=KILL_WAIT_S)
    return proc.returncode, killed, list(tail)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # never written, or the part died before its first row
        return None


def part_status(part: Part, entry: dict, rc: int | None, killed: bool) -> str:
    rows = entry.get("rows") or []
    if any(not r.get("check", {"ok": True})["ok"] for r in rows):
        return "loss check MISMATCH"
    if killed:
        if part.kind == "train":
            done, total = sum(r["status"] == "ok" for r in rows), len(part.recipes)
        else:
            done, total = int(bool(entry.get("result"))), 1
        return f"cut at budget: killed at its slot's end, {done} of {total} measured"
    if rc != 0:
        return f"failed (exit {rc})"
    result = entry.get("result")
    cut_rows = [r for r in rows if r["status"].startswith("skipped")
                or (r["status"] == "ok" and r["timed_steps"] < r["steps"])]
    if cut_rows or (result and result["seed_loop"]["crops"] < result["crops"]):
        return "cut at budget: " + (", ".join(r["recipe"] for r in cut_rows) or "seed loop")
    return "ok"


def write_results(results: dict, out_dir: Path) -> None:
    """results.json, then results.md, each replaced atomically: a kill between parts leaves both whole.

    The JSON is what gpu_tables.py reads; a rendering bug must not cost it (nor stop the suite).
    """
    def write(name: str, text: str) -> None:
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)

    write("results.json", json.dumps(results, indent=1) + "\n")
    try:
        md = render_markdown(results)
    except Exception as e:  # noqa: BLE001 (any bug in the renderer: keep measuring)
        md = f"# GPU suite\n\nresults.md could not be rendered ({type(e).__name__}: {e}); see results.json\n"
    write("results.md", md)


def run_suite(parts: list[Part], mode: str, out_dir: Path, results: dict, deadline: float,
              env: dict[str, str], fixtures: dict | None = None) -> dict:
    """Run the parts inside `deadline` (Unix time), rewriting the results files after each one; each part
    reads `fixtures` (gpu_fixtures.build), else builds its own data."""
    available = bench_train_recipes()
    plan: list[tuple[Part, dict]] = []
    for part in parts:
        entry: dict[str, Any] = {"name": part.name, "kind": part.kind, "status": "pending",
                                 "recipes": part.recipes, "memory_cap_gb": part.memory_cap_gb,
                                 "share_s": part.share}
        missing = [r for r in part.recipes if r.partition(":")[0] not in available]
        if part.kind == "train" and missing:
            entry["not_available"] = missing
            part = replace(part, recipes=[r for r in part.recipes if r not in missing])
            if not part.recipes:
                entry["status"] = f"skipped: not available (no {', '.join(missing)} recipe in bench_train.py)"
        results["parts"].append(entry)
        plan.append((part, entry))
    write_results(results, out_dir)

    runnable = [p for p, e in plan if e["status"] == "pending"]
    start = time.time()
    scale = max(deadline - RESERVE_S - start, 0.0) / max(sum(p.share for p in runnable), 1e-9)
    end = start
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for part, entry in plan:
            if entry["status"] != "pending":
                print(f"\n== {part.name}: {entry['status']}", flush=True)
                continue
            end += part.share * scale
            slot = end - time.time()
            entry["slot_s"] = round(slot, 1)
            if slot < part.min_s:
                entry["status"] = f"skipped: {slot:.1f} s left in its slot, needs at least {part.min_s:g} s"
                print(f"\n== {part.name}: {entry['status']}", flush=True)
                write_results(results, out_dir)
                continue
            json_path = Path(tmp, f"{part.name}.json")
            cmd = command(part, mode, fixtures)
            shown = (os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd[2:])
            if fixtures:  # a temporary folder: name it by what it holds
                shown = (c.replace(str(Path(fixtures["data_dir"]).parent), "FIXTURES") for c in shown)
            entry["command"] = shlex.join(["python", *shown])
            cmd += ["--json", str(json_path), "--deadline", f"{end - min(GRACE_S[mode], slot / 4):.1f}"]
            print(f"\n== {part.name}: slot {slot:.0f} s\n$ {entry['command']}", flush=True)
            t = time.time()
            rc, killed, tail = run_part(cmd, end, env)
            entry["seconds"] = round(time.time() - t, 1)
            entry["returncode"] = rc
            entry["rows" if part.kind == "train" else "result"] = read_json(json_path)
            entry["status"] = part_status(part, entry, rc, killed)
            entry["log_tail"] = tail
            print(f"== {part.name}: {entry['status']} ({entry['seconds']:.0f} s)", flush=True)
            results["suite"]["elapsed_s"] = time.time() - results["suite"]["t0"]
            found = [r.get("device") for r in entry.get("rows") or []]
            found.append((entry.get("result") or {}).get("device"))
            results["suite"]["device"] = results["suite"]["device"] or next((d for d in found if d), None)
            write_results(results, out_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, every part, tens of seconds")
    ap.add_argument("--budget_s", type=float, help="whole suite from GPU_SUITE_T0 (default 360; smoke 300)")
    ap.add_argument("--only", nargs="+", metavar="PART", help=f"run only these of {', '.join(ORDER)}")
    a = ap.parse_args(argv)
    mode = "smoke" if a.smoke else "gpu"
    t0 = float(os.environ.get("GPU_SUITE_T0") or time.time())
    budget = a.budget_s or BUDGET_S[mode]
    parts = suite_parts(mode)
    if a.only:
        if unknown := set(a.only) - set(ORDER):
            ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
        parts = [p for p in parts if p.name in a.only]
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    versions, bad = environment()
    results: dict[str, Any] = {"suite": {
        "mode": mode, "config": "tiny" if a.smoke else "full", "status": "running",
        "started_utc": datetime.fromtimestamp(t0, timezone.utc).isoformat(timespec="seconds"),
        "t0": t0, "budget_s": budget, "elapsed_s": time.time() - t0, "device": None, "gpu": nvidia_smi(),
        "python": sys.version.split()[0], "versions": versions, "unmet": bad,
    }, "parts": []}
    plan = planned_s(parts, "gpu")
    print(f"gpu_suite ({mode}): budget {budget:.0f} s from GPU_SUITE_T0 (planned {plan:.0f} s on an H200), "
          f"{time.time() - t0:.0f} s used by set-up; gpu: {results['suite']['gpu']}; "
          f"torch {versions.get('torch')}, transformers {versions.get('transformers')}", flush=True)
    if bad:  # every part would die on its imports, or run on code CI never tested: stop in seconds
        for line in bad:
            print(f"unmet: {line}", file=sys.stderr)
        results["suite"]["status"] = (f"aborted: {len(bad)} unmet need(s): {'; '.join(bad)} (carry them: "
                                      "benchmarks/gpu_wheels.sh, see benchmarks/README.md)")
        write_results(results, out_dir)
        print(f"error: {results['suite']['status']}", file=sys.stderr)
        return 2

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.smoke:  # on a shared CPU, intra-op threads of the tiny model's small ops only fight each other
        env.setdefault("OMP_NUM_THREADS", "1")
    s = results["suite"]
    s["stages_s"] = {"set-up before the suite (wheels)": round(time.time() - t0, 1)}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_fixtures_") as tmp:
        t = time.time()
        try:
            s["fixtures"] = fixtures = build_fixtures(Path(tmp), mode)
        except Exception as e:  # noqa: BLE001 (no part can run without data: say why in the results)
            s["status"] = f"aborted: building the fixtures failed ({type(e).__name__}: {e})"
            write_results(results, out_dir)
            print(f"error: {s['status']}", file=sys.stderr)
            return 2
        s["stages_s"]["fixtures (data once for every part)"] = round(time.time() - t, 1)
        print(f"fixtures: {fixtures['crops']} crops, the longest {fixtures['longest_crop']['length']} tokens "
              f"(max_length {fixtures['max_length']}), in {time.time() - t:.0f} s", flush=True)
        run_suite(parts, mode, out_dir, results, t0 + budget, env, fixtures)
    s["stages_s"] |= {p["name"]: p.get("seconds") for p in results["parts"]}
    s["elapsed_s"] = time.time() - t0
    bad = [p["name"] for p in results["parts"] if p["status"].startswith(("failed", "loss check"))]
    s["status"] = f"failed parts: {', '.join(bad)}" if bad else "ok"
    write_results(results, out_dir)
    print("\n" + render_markdown(results), flush=True)
    print("stages (s): " + ", ".join(f"{k} {num(v, '.0f')}" for k, v in s["stages_s"].items())
          + f"; total {s['elapsed_s']:.0f} of {budget:.0f}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
