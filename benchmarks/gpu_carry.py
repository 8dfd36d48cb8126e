"""What the GPU machine needs carried, derived from requirements.txt and the image's package list.

    python benchmarks/gpu_carry.py resolve --wheel_dir .whl     # download the set, rewrite gpu_carry.lock
    python benchmarks/gpu_carry.py check                        # needs vs image + lock, no download (a test)
    python benchmarks/gpu_carry.py download --wheel_dir DIR --python_version 3.11   # the lock's set, here

The image (benchmarks/gpu_image.txt: the device tool's KINDS.md list, pinned where it gives a version) has no
registry, so every requirement of requirements.txt, and every need of each wheel carried for it (Requires-Dist
read from the wheel's METADATA, markers evaluated for CPython 3.12 on manylinux x86-64), that the image lacks
or holds in a version outside the spec is carried as a wheel. A package on the image whose version is not
known is taken as meeting the spec: gpu_suite.py checks the real versions on the device before any part runs.

The lock (benchmarks/gpu_carry.lock, JSON, committed) holds each carried wheel's name, version, file and
requirements, and why it is carried, so `check` (and tests/benchmarks/test_gpu_suite.py) needs no download.
`resolve`
prefers the lock's versions where the specs allow them (--update: the newest), so a rerun downloads the same
set. PINS are the GPU image's own choices, kept here, not in requirements.txt (benchmarks/README.md says why).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "benchmarks" / "gpu_image.txt"
LOCK = ROOT / "benchmarks" / "gpu_carry.lock"
REQUIREMENTS = ROOT / "requirements.txt"
# transformers 5.25 needs huggingface-hub>=2.4 (the image has 1.33.0) and kernels (absent); 5.18-5.24 need
# huggingface-hub>=1.31,<3 and tokenizers>=0.23.1,<0.24, which the image meets (benchmarks/README.md has the
# table): 5.24.0 is the newest release that runs on the image with no hub or kernels carried.
PINS = {"transformers": "5.24.0"}
# On the image with no version listed, carried anyway: requirements.txt asks for peft>=0.21, the newest series
# (0.21.0-0.21.2 of 38 releases), which an image read in 2026-11 may predate; the wheel is 0.5 MB, and an
# unmet need stops the whole suite on the GPU.
CARRY_UNLISTED = {"peft"}
# Requirements the suite does without, never carried nor checked: the device tool carries 64 MiB in all, the
# working tree included, and wordfreq's wheel is 56.8 MB (word lists of 40+ languages; 3.1.1).
LEFT_OUT = {"wordfreq": "56.8 MB wheel against the device tool's 64 MiB carry limit; only "
                        "synthesize_lines.py imports it (inside a function), and no suite part runs that"}
# serve.py's stack: only paddleocr_vl_manga/serve imports it, and no suite part serves.
LEFT_OUT |= {name: "serve.py's server only; no suite part serves" for name in ("fastapi", "uvicorn",
                                                                                "python-multipart")}
# pip matches a manylinux tag exactly: offer glibc 2.5 to 2.39 (the image's Python 3.12.3 is Ubuntu 24.04's)
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]


def target_environment(python: str = "3.12.3") -> dict[str, str]:
    """Marker variables of the image's interpreter: CPython `python` on Linux x86-64, no extra."""
    env = default_environment()
    env.update(python_version=".".join(python.split(".")[:2]), python_full_version=python,
               implementation_name="cpython", implementation_version=python,
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix", platform_machine="x86_64", extra="")
    return env


def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """gpu_image.txt -> {canonical name: version or None (on the image, version unknown)}."""
    image: dict[str, str | None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = version.strip() or None
    return image


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line]


def applies(req: Requirement, env: dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA, as written (markers and extras included)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    head = text.split("\n\n", 1)[0]  # the headers; the long description follows the first blank line
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


@dataclass
class Carried:
    name: str
    version: str
    wheel: str
    requires: list[str]
    why: list[str] = field(default_factory=list)  # "requirements.txt: jaconv>=0.3 (not on the image)", ...


def pip_download(spec: str, dest: Path, python_version: str = "3.12", platforms: Iterable[str] = PLATFORMS,
                 python: str = sys.executable) -> Path:
    """One wheel, no dependencies, for the given Python on manylinux x86-64; returns its path in dest."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "-d", tmp, spec]
        for p in platforms:
            cmd += ["--platform", p]
        proc = subprocess.run(cmd, capture_output=True, text=True)  # its warnings about the local indexes
        if proc.returncode:
            raise SystemExit(f"error: pip download {spec} failed:\n{proc.stderr.strip()}")
        (wheel,) = Path(tmp).glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.move(str(wheel), dest / wheel.name))


def resolve(requirements: list[Requirement], image: dict[str, str | None], download: Callable[[str], Path],
            pins: dict[str, str] | None = None, prefer: dict[str, str] | None = None,
            env: dict[str, str] | None = None) -> dict[str, Carried]:
    """The carried set: requirements and, recursively, the needs of carried wheels that the image does not
    meet. download(spec) fetches one wheel (no deps) and returns its path. pins: exact versions to carry
    whatever the image has (PINS); prefer: versions to take where the specs allow them (the old lock)."""
    env = env or target_environment(image.get("python") or "3.12.3")
    pins = {canonicalize_name(k): v for k, v in (pins or {}).items()}
    prefer = {canonicalize_name(k): v for k, v in (prefer or {}).items()}
    specs: dict[str, SpecifierSet] = {}
    reasons: dict[str, list[str]] = {}
    carried: dict[str, Carried] = {}
    queue: list[tuple[Requirement, str]] = [(r, "requirements.txt") for r in requirements]
    while queue:
        req, by = queue.pop(0)
        if not applies(req, env):
            continue
        name = canonicalize_name(req.name)
        if name in LEFT_OUT:
            continue
        specs[name] = specs.get(name, SpecifierSet()) & req.specifier
        have = image.get(name)
        unlisted = have is None and name in CARRY_UNLISTED
        if name not in pins and name in image and not unlisted and (
                have is None or specs[name].contains(have, True)):
            continue  # the image meets it (or is taken to: version unknown)
        reasons.setdefault(name, [])
        note = f"{by}: {req.name}{req.specifier}"
        if note not in reasons[name]:
            found = f"the image has {have or 'a version not listed'}" if name in image else "not on the image"
            found = f"pinned to {pins[name]} for the image" if name in pins else found
            reasons[name].append(f"{note} ({found})")
        old = carried.get(name)
        if old and specs[name].contains(old.version, True):
            continue
        if name in pins:
            spec = f"{name}=={pins[name]}"
        elif name in prefer and specs[name].contains(prefer[name], True):
            spec = f"{name}=={prefer[name]}"
        else:
            spec = f"{name}{specs[name]}"
        wheel = download(spec)
        version = str(parse_wheel_filename(wheel.name)[1])
        if not specs[name].contains(version, True):
            raise SystemExit(f"error: {spec} gave {wheel.name}, outside {specs[name]} (needed by {by})")
        carried[name] = Carried(name, version, wheel.name, wheel_requires(wheel), reasons[name])
        queue += [(Requirement(r), f"{name} {version}") for r in carried[name].requires]
    return dict(sorted(carried.items()))


def unmet(requirements: list[Requirement], version_of: Callable[[str], str | None],
          requires_of: dict[str, list[str]], env: dict[str, str]) -> list[str]:
    """Each need, of requirements.txt and of every package in requires_of (name -> Requires-Dist), that
    version_of(name) (None: absent) does not meet, as one line naming who needs what and what was found."""
    needs = [(r, "requirements.txt") for r in requirements]
    for name, lines in requires_of.items():
        needs += [(Requirement(line), f"{name} {version_of(name)}") for line in lines]
    bad = []
    for req, by in needs:
        if not applies(req, env) or canonicalize_name(req.name) in LEFT_OUT:
            continue
        have = version_of(canonicalize_name(req.name))
        if have is None:
            bad.append(f"{by} needs {req.name}{req.specifier}: not installed")
        elif have != "?" and not req.specifier.contains(have, True):
            bad.append(f"{by} needs {req.name}{req.specifier}: found {have}")
    return bad


def static_unmet(requirements: list[Requirement], image: dict[str, str | None], lock: dict) -> list[str]:
    """unmet() on the image plus the lock's carried wheels, without downloading anything ("?": on the image,
    version unknown, taken as meeting the spec)."""
    carried = {c["name"]: c for c in lock["carried"]}

    def version_of(name: str) -> str | None:
        if name in carried:
            return carried[name]["version"]
        return (image[name] or "?") if name in image else None

    env = target_environment(image.get("python") or lock.get("python") or "3.12.3")
    return unmet(requirements, version_of, {n: c["requires"] for n, c in carried.items()}, env)


def read_lock(path: Path = LOCK) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_lock(path: Path, carried: dict[str, Carried], image: dict[str, str | None]) -> None:
    lock = {"comment": "written by benchmarks/gpu_wheels.sh (benchmarks/gpu_carry.py resolve); do not edit",
            "python": image.get("python") or "3.12.3", "platform": "manylinux x86_64", "pins": PINS,
            "left_out": LEFT_OUT, "carried": [asdict(c) for c in carried.values()]}
    path.write_text(json.dumps(lock, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["resolve", "check", "download"])
    ap.add_argument("--wheel_dir", type=Path, default=ROOT / ".whl", help="where the wheels go")
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--lock", type=Path, default=LOCK)
    ap.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    ap.add_argument("--update", action="store_true", help="resolve: newest versions, not the lock's")
    ap.add_argument("--python_version", default="3.12", help="download: the wheels' Python (binary ones)")
    a = ap.parse_args(argv)
    for path in (a.image, a.requirements):
        if not path.is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    image, requirements = read_image(a.image), read_requirements(a.requirements)
    if a.command == "resolve":
        prefer = {} if a.update or not a.lock.is_file() else {
            c["name"]: c["version"] for c in read_lock(a.lock)["carried"]}
        carried = resolve(requirements, image, lambda spec: pip_download(spec, a.wheel_dir), PINS, prefer)
        write_lock(a.lock, carried, image)
        for c in carried.values():
            print(f"carry {c.name}=={c.version}: {'; '.join(c.why)}")
    elif a.command == "download":  # the lock's exact set, for another Python (the preflight's twin)
        for c in read_lock(a.lock)["carried"]:
            pip_download(f"{c['name']}=={c['version']}", a.wheel_dir, a.python_version)
    if not a.lock.is_file():
        print(f"error: {a.lock} not found; run benchmarks/gpu_wheels.sh", file=sys.stderr)
        return 2
    bad = static_unmet(requirements, image, read_lock(a.lock))
    for line in bad:
        print(f"unmet: {line}", file=sys.stderr)
    if bad:
        print(f"error: {len(bad)} need(s) unmet on the GPU image plus the carried wheels ({a.image.name}, "
              f"{a.lock.name})", file=sys.stderr)
        return 1
    print(f"every need of {a.requirements.name} is met by {a.image.name} plus {a.lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
