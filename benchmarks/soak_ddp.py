"""Soak test: run the 2-process train.sh path N times and count the clean passes (not run by CI).

    python benchmarks/soak_ddp.py --runs 20                 # NUM_GPUS=2 on one node (gloo without a GPU)
    python benchmarks/soak_ddp.py --runs 20 --nodes 2       # two launches as node 0 and node 1

Each run trains the tiny model for --steps steps with checkpoints, evaluation and best-model loading on, as
train.sh sets them, and passes when both ranks exit 0 and the output folder holds the final model at the
final step. A race between ranks shows up as an occasional failure, so run it many times.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_fixtures(work: Path) -> tuple[Path, Path]:
    import paddleocr_vl_manga.data.manga109 as prep
    from tools.make_synthetic_manga109 import CHARSET, generate
    from tools.make_tiny_model import build_tiny_model

    generate(work / "Manga109s", books=5, pages=3, seed=7, width=800, height=560, num_workers=1)
    build_tiny_model(work / "tiny_model", charset=CHARSET)
    prep.run(prep.PrepareArguments(manga109_root=str(work / "Manga109s"), output_dir=str(work / "data"),
                                   num_workers=1, test_fraction=0.2, val_fraction=0.2))
    return work / "tiny_model", work / "data"


def one_run(model: Path, data: Path, out: Path, steps: int, nodes: int) -> tuple[bool, str]:
    env = dict(os.environ, PYTHON=sys.executable, MODEL_PATH=str(model), DATA_DIR=str(data),
               OUTPUT_DIR=str(out), LR="3e-3", BATCH_SIZE="2", GRAD_ACCUM="1", SAVE_STEPS="2",
               EVAL_GENERATION_SAMPLES="4", NUM_WORKERS="0", LOGGING_STEPS="2")
    cmd = ["bash", str(ROOT / "train.sh"), "--max_steps", str(steps), "--max_eval_samples", "4",
           "--disable_tqdm", "true", "--generation_max_new_tokens", "8"]
    if nodes == 1:
        envs = [dict(env, NUM_GPUS="2")]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        envs = [dict(env, NNODES=str(nodes), NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                     RDZV_ID=f"soak-{port}") for r in range(nodes)]
    procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for e in envs]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    if any(p.returncode for p in procs):
        lines = [line for e in errs for line in e.splitlines() if "error" in line.lower()]
        return False, (lines or errs[0].splitlines() or ["(no output)"])[0][:300]
    step = json.loads((out / "trainer_state.json").read_text())["global_step"]
    has_model = (out / "model.safetensors").is_file()
    if step != steps or not has_model:
        return False, f"ended at step {step}, model.safetensors present: {has_model}"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="how many times to run (default 20)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (checkpoint every 2)")
    ap.add_argument("--nodes", type=int, default=1, choices=[1, 2],
                    help="1: NUM_GPUS=2 on one node; 2: two launches of one process, as node 0 and 1")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak_ddp_") as tmp:
        model, data = build_fixtures(Path(tmp))
        passed, start = 0, time.time()
        for i in range(1, a.runs + 1):
            t = time.time()
            ok, why = one_run(model, data, Path(tmp) / f"out{i}", a.steps, a.nodes)
            passed += ok
            verdict = "pass" if ok else f"FAIL {why}"
            print(f"run {i:3d}/{a.runs}: {verdict} ({time.time() - t:.0f} s)", flush=True)
    print(f"{passed}/{a.runs} passed ({'2 nodes x 1' if a.nodes == 2 else '1 node x 2'} processes, "
          f"{a.steps} steps each, {time.time() - start:.0f} s)")
    return 0 if passed == a.runs else 1


if __name__ == "__main__":
    sys.exit(main())
