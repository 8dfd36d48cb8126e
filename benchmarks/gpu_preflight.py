"""The GPU image's twin on this machine, then the smoke suite in it: the step before every GPU run.

    bash benchmarks/gpu_suite.sh OUT_DIR --preflight      # (this script, through gpu_suite.sh)

1. A venv (cached in ~/.cache/paddleocr-vl-manga/gpu-twin, reused while benchmarks/gpu_image.txt,
   gpu_carry.lock, requirements.txt and this script are unchanged) with the image's packages that the suite
   relies on: requirements.txt's and the carried wheels' needs that the image meets, plus the image's own
   transformers (which the carried one shadows, as there) and sentencepiece. Versions: the image's where
   gpu_image.txt pins one and this machine can install it, the newest compatible elsewhere; every deviation
   is printed. torch: the CPU wheel 2.13.0+cpu for Python 3.11 (TORCH; the registry's torch for other
   Pythons is a multi-GB CUDA build) in place of the image's 2.11.0; no torchvision (NOT_HERE says why).
2. The lock's carried wheels downloaded for this Python (binary ones differ; pure ones are the same files),
   and a CJK font beside them, as .whl/ holds them for the GPU.
3. `bash benchmarks/gpu_suite.sh OUT_DIR --smoke` with PYTHON=the twin and GPU_WHEELS=those wheels: the same
   `pip install --no-index --no-deps --target` as on the GPU, the same fatal check of every need, then every
   part on the tiny model. Exit status: the suite's (non-zero on any failure), 1 also when a part was cut or
   skipped at its time budget, 2 if the twin cannot be built.
Prints each stage's seconds at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_carry  # noqa: E402

CACHE = Path(os.environ.get("GPU_TWIN_CACHE") or Path.home() / ".cache" / "paddleocr-vl-manga" / "gpu-twin")
# This machine's torch: the CPU wheel (the Makefile's TORCH), for Python 3.11 only.
TORCH = {"torch": "2.13.0+cpu"}
# On the image, not in the twin. Measured here: torchvision 0.28.0 (the release for torch 2.13) installs,
# and then every transformers import of the model fails.
NOT_HERE = {"torchvision": "the registry's wheels link CUDA torch's libraries (libtorch_cuda.so, absent "
                           "from the CPU torch): importing it fails ('operator torchvision::nms does not "
                           "exist'); so transformers takes its PIL image-processor path here, its torchvision"
                           " one there"}
TWIN_ALSO = ["transformers", "sentencepiece"]  # on the image; transformers takes other paths with them
# What the device call carries (gpu_wheels.sh fills it). The twin installs the lock's set, so .whl/ must hold
# that set too: it is ignored by git and outlives a pull that changes the lock (peft joined it so), and a
# stale or missing .whl/ would pass here and stop the suite on the GPU at its need check.
CARRIED = ROOT / ".whl"


def run(cmd: list[str]) -> None:
    """Run cmd; its output only when it fails (pip warns about this machine's local indexes on every name)."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def relied_on(image: dict[str, str | None], lock: dict) -> list[str]:
    """Image packages the suite imports or the carried wheels need: requirements.txt's and the carried
    wheels' needs, and TWIN_ALSO; carried ones too where the image has its own (shadowed there, as here)."""
    carried = {canonicalize_name(c["name"]) for c in lock["carried"]}
    env = gpu_carry.target_environment(lock.get("python", "3.12.3"))
    reqs = gpu_carry.read_requirements() + [Requirement(r) for c in lock["carried"] for r in c["requires"]]
    names = {canonicalize_name(r.name) for r in reqs if gpu_carry.applies(r, env)} | set(TWIN_ALSO)
    skip = set(gpu_carry.LEFT_OUT) | set(NOT_HERE)
    return sorted(n for n in names | carried if n in image and n not in skip)


def available(python: Path, name: str) -> list[str]:
    """Versions of `name` pip can install for this machine's Python (pip index versions)."""
    cmd = [str(python), "-m", "pip", "index", "versions", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("Available versions:")), "")
    return [v.strip() for v in line.partition(":")[2].split(",") if v.strip()]


def carried_problems(wheel_dir: Path, lock: dict) -> list[str]:
    """How wheel_dir differs from what the GPU needs carried: the lock's wheel files, exactly, and a font."""
    want = {c["wheel"] for c in lock["carried"]}
    have = {p.name for p in wheel_dir.glob("*.whl")}
    problems = [f"missing {w}" for w in sorted(want - have)]
    problems += [f"not in the lock {w} (two versions of one package stop the install there)"
                 for w in sorted(have - want)]
    if not any((wheel_dir / "fonts").glob("*")):
        problems.append("no CJK font in fonts/ (the image has none)")
    return problems


def cache_key() -> str:
    """What the twin is built from: image list, lock, requirements.txt, this Python, the choices here."""
    h = hashlib.sha256(repr((sys.version, TORCH, NOT_HERE, TWIN_ALSO, gpu_carry.LEFT_OUT)).encode())
    for path in (gpu_carry.IMAGE, gpu_carry.LOCK, gpu_carry.REQUIREMENTS):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_twin(twin: Path, wheels: Path) -> list[str]:
    """Build the venv and the wheel folder; return the deviations from the image, one line each."""
    image, lock = gpu_carry.read_image(), gpu_carry.read_lock()
    shutil.rmtree(twin, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(twin / "venv")])
    python = twin / "venv" / "bin" / "python"
    names = relied_on(image, lock)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    why: dict[str, str] = {}  # image pins this machine cannot install, and why
    pins = {}
    for name in names:
        if name in TORCH:
            why[name] = "the CPU torch wheel for this Python"
        elif image[name] and image[name] not in available(python, name):
            why[name] = f"no {image[name]} for Python {py}: the newest compatible"
        elif image[name]:
            pins[name] = image[name]
    constraints = twin / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    specs = [f"{n}=={TORCH[n]}" if n in TORCH else n for n in names]
    run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *specs])
    # The carried wheels for this Python, exactly the lock's versions, and a font, as .whl/ on the GPU
    run([sys.executable, str(ROOT / "benchmarks" / "gpu_carry.py"), "download", "--wheel_dir", str(wheels),
         "--python_version", py])
    fonts = subprocess.run([sys.executable, str(ROOT / "tools" / "fonts.py")], capture_output=True, text=True)
    font = next((f for f in fonts.stdout.splitlines() if f.endswith((".ttf", ".otf", ".ttc"))), None)
    if font:
        (wheels / "fonts").mkdir(parents=True, exist_ok=True)
        shutil.copy(font, wheels / "fonts")
    installed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                                          capture_output=True, text=True, check=True).stdout)
    have = {canonicalize_name(p["name"]): p["version"] for p in installed}
    deviations = [f"python {sys.version.split()[0]} here, {image.get('python')} on the image (the Python of "
                  "this machine's CPU torch wheel)"]
    deviations += [f"{n} {have.get(n)} here, {image[n]} on the image ({why.get(n, 'pip chose it')})"
                   for n in names if image[n] and have.get(n) != image[n]]
    deviations += [f"{n} absent here, {image.get(n) or 'a version'} on the image: {why}" for n, why in
                   NOT_HERE.items() if n in image]
    unknown = ", ".join(f"{n} {have.get(n)}" for n in names if not image[n])
    deviations.append(f"on the image, version not listed; newest compatible here: {unknown}")
    (twin / "deviations.txt").write_text("".join(d + "\n" for d in deviations))
    return deviations


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: bash benchmarks/gpu_suite.sh OUT_DIR --preflight [--budget_s S] [--only PART ...]",
              file=sys.stderr)
        return 2
    if problems := carried_problems(CARRIED, gpu_carry.read_lock()):
        print(f"error: {CARRIED} is not what benchmarks/gpu_carry.lock says the GPU needs carried ("
              f"{'; '.join(problems)}): run PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh",
              file=sys.stderr)
        return 2
    if sys.version_info[:2] != (3, 11):
        print(f"error: the preflight needs Python 3.11 (this machine's CPU torch wheel), not "
              f"{sys.version.split()[0]}: PYTHON=.venv/bin/python", file=sys.stderr)
        return 2
    stages: dict[str, float] = {}
    twin, wheels, key = CACHE, CACHE / "wheels", cache_key()
    t = time.time()
    cached = (twin / "key").is_file() and (twin / "key").read_text() == key
    if cached:
        print(f"preflight: reusing the twin in {twin} (inputs unchanged)", flush=True)
    else:
        print(f"preflight: building the GPU image's twin in {twin}", flush=True)
        try:
            build_twin(twin, wheels)
        except subprocess.CalledProcessError as e:
            print(f"error: building the twin failed at: {' '.join(map(str, e.cmd))}", file=sys.stderr)
            return 2
        (twin / "key").write_text(key)
    stages["twin " + ("(cached)" if cached else "build")] = time.time() - t
    print("deviations from the GPU image:\n" + "".join(f"  - {d}\n" for d in
                                                      (twin / "deviations.txt").read_text().splitlines()),
          flush=True)
    env = dict(os.environ, PYTHON=str(twin / "venv" / "bin" / "python"), GPU_WHEELS=str(wheels))
    env.pop("GPU_SUITE_T0", None)
    env.pop("PYTHONPATH", None)
    t = time.time()
    rc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), argv[0], "--smoke", *argv[1:]],
                        env=env).returncode
    stages["smoke suite in the twin"] = time.time() - t
    try:  # a part cut or skipped at its budget here would be one that ran out of time on the GPU too
        parts = json.loads((Path(argv[0]) / "results.json").read_text(encoding="utf-8"))["parts"]
        not_ok = [f"{p['name']}: {p['status']}" for p in parts if p["status"] != "ok"]
    except (OSError, ValueError, KeyError):
        not_ok = ["no results.json"]
    if rc == 0 and not_ok:
        print("error: parts not ok in the twin: " + "; ".join(not_ok), file=sys.stderr)
        rc = 1
    print("\npreflight stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
    print(f"preflight: {'OK' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
