"""benchmarks/gpu_suite.sh in --smoke mode end to end, its time budget, and gpu_tables.py on a README copy."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_eval  # noqa: E402
import bench_train  # noqa: E402
import gpu_carry  # noqa: E402
import gpu_suite  # noqa: E402
import gpu_tables  # noqa: E402


def between(text: str, name: str) -> str:
    return text.split(f"<!-- gpu-table:{name} -->")[1].split(f"<!-- /gpu-table:{name} -->")[0]


@pytest.mark.slow
def test_smoke_suite_writes_results_and_readme_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("GPU_SUITE_T0", None)
    t = time.time()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    took = time.time() - t
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "suite.log"]

    results = json.loads((out / "results.json").read_text())
    suite, parts = results["suite"], {p["name"]: p for p in results["parts"]}
    assert suite["mode"] == "smoke" and suite["status"] == "ok" and suite["device"].startswith("cpu")
    assert list(parts) == gpu_suite.ORDER and suite["elapsed_s"] <= took + 1
    # one data folder (and tiny model) for every part, built before the first; its longest crop fits
    assert len({p["command"].split("--data_dir ")[1].split()[0] for p in parts.values()}) == 1
    assert all("--tiny_dir" in p["command"] for p in parts.values())
    fx = suite["fixtures"]
    assert fx["longest_crop"]["length"] <= fx["max_length"] and fx["crops"] > 1
    assert list(suite["stages_s"])[-len(parts):] == gpu_suite.ORDER and "stages (s): " in proc.stdout
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["status"], part.get("log_tail"))
        assert part["seconds"] <= part["slot_s"]
        if part["kind"] == "train":  # every planned recipe measured, loss checked against fp32
            assert [r["recipe"] for r in part["rows"]] == part["recipes"]
            for r in part["rows"]:
                assert r["status"] == "ok" and r["check"]["ok"] and r["samples_per_s"] > 0
                assert r["timed_steps"] == r["steps"] == 1
    ev = parts["eval"]["result"]
    assert ev["crops"] == ev["seed_loop"]["crops"] == ev["compared"] == 8
    assert ev["identical"] == 8 and ev["ratio"] > 0

    md = (out / "results.md").read_text()
    seed = next(r for r in parts["train_12gb"]["rows"] if r["recipe"] == "seed")
    seed_line = next(line for line in md.splitlines() if line.startswith("| CPU") and "`seed`" in line)
    assert f"| {seed['samples_per_s']:.2f} |" in seed_line and "| 1.00× |" in seed_line
    assert "## train.sh defaults from these figures" in md
    rope = md.split("### Rope position ids")[1].split("## Evaluation")[0]  # measured with and without
    assert "| `default:bs=2,ga=8` |" in rope and "| `default:bs=2,ga=8,rope=0` |" in rope and "× |" in rope
    assert "== train_12gb: slot" in (out / "suite.log").read_text()

    # gpu_tables.py on a README copy: refuses smoke figures unless told, then rewrites only the tables, once.
    readme = tmp_path / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", readme)
    original = readme.read_text()
    tables = [sys.executable, str(ROOT / "benchmarks" / "gpu_tables.py"), str(out / "results.json"),
              "--readme", str(readme)]
    refused = subprocess.run(tables, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--smoke run" in refused.stderr and readme.read_text() == original
    first = subprocess.run([*tables, "--allow_smoke"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "tables rewritten" in first.stdout, first.stderr
    written = readme.read_text()
    for name in ("train", "eval"):
        assert "Pending" in between(original, name) and "Pending" not in between(written, name)
    assert f"| {seed['samples_per_s']:.2f} |" in between(written, "train")
    assert f"| {ev['batched']['crops_per_s']:.2f} |" in between(written, "eval")
    outside_before, outside_after = original, written  # everything outside the markers is kept byte for byte
    for name in ("train", "eval"):
        outside_before = outside_before.replace(between(original, name), "")
        outside_after = outside_after.replace(between(written, name), "")
    assert outside_before == outside_after
    second = subprocess.run([*tables, "--allow_smoke"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "already up to date" in second.stdout
    assert readme.read_text() == written


FAKE_TRAIN = """
import json, subprocess, sys, time
a = sys.argv
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # as a DataLoader worker
open(a[0] + ".pid", "w").write(str(worker.pid))
row = {"recipe": "seed", "bxa": "1x16", "gc": True, "status": "ok", "steps": 1, "timed_steps": 1,
       "samples_per_s": 2.0, "tokens_per_s": 100.0, "peak_gib": None, "mfu": None, "device": "cpu (fake)",
       "settings": {"precision": "seed_bf16"}}
json.dump([row], open(a[a.index("--json") + 1], "w"))
print("seed done; default hangs", flush=True)
time.sleep(120)  # ignores --deadline: only the kill at the slot's end stops it
"""
FAKE_FAIL = "print('boom', flush=True); raise SystemExit(3)"
FAKE_EVAL = """
import json, sys
a = sys.argv
res = {"device": "cpu (fake)", "crops": 4, "batch_size": 16, "ratio": 2.0, "identical": 4, "compared": 4,
       "peak_gib": None, "seed_loop": {"crops": 4, "seconds": 2.0, "crops_per_s": 2.0},
       "batched": {"crops": 4, "seconds": 1.0, "crops_per_s": 4.0}}
json.dump(res, open(a[a.index("--json") + 1], "w"))
"""


def _alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped by an init that may never reap it) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_budget_cuts_a_hung_part_and_keeps_everything_else(tmp_path: Path) -> None:
    scripts = {}
    for name, code in (("hang", FAKE_TRAIN), ("fail", FAKE_FAIL), ("eval", FAKE_EVAL)):
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(code)
    parts = [
        gpu_suite.Part("hang", "train", 1, 0, ["seed", "default"], 12, script=str(scripts["hang"])),
        gpu_suite.Part("lora", "train", 1, 0, ["no_such_recipe"]),  # dropped before the slots are cut
        gpu_suite.Part("fail", "eval", 1, 0, script=str(scripts["fail"])),
        gpu_suite.Part("eval", "eval", 1, 0, script=str(scripts["eval"])),
        gpu_suite.Part("too_big", "eval", 1, 1000, script=str(scripts["eval"])),
    ]
    results = {"suite": {"mode": "smoke", "config": "tiny", "status": "running", "started_utc": "2026-01-01",
                         "t0": time.time(), "budget_s": 8.0, "elapsed_s": 0.0, "device": None}, "parts": []}
    start = time.time()
    gpu_suite.run_suite(parts, "smoke", tmp_path, results, start + gpu_suite.RESERVE_S + 8, dict(os.environ))
    took = time.time() - start
    got = {p["name"]: p for p in results["parts"]}
    assert took < 8 + gpu_suite.KILL_WAIT_S, took

    hang = got["hang"]
    assert hang["status"] == "cut at budget: killed at its slot's end, 1 of 2 measured"
    assert 1.5 < hang["seconds"] < hang["slot_s"] + gpu_suite.KILL_WAIT_S and hang["slot_s"] <= 2.1
    assert [r["recipe"] for r in hang["rows"]] == ["seed"]  # the row written before the kill is kept
    assert any("default hangs" in line for line in hang["log_tail"])
    assert not _alive(int(Path(str(scripts["hang"]) + ".pid").read_text()))  # its worker went with it
    assert got["lora"]["status"] == "skipped: not available (no no_such_recipe recipe in bench_train.py)"
    assert got["fail"]["status"] == "failed (exit 3)" and "boom" in got["fail"]["log_tail"]
    assert got["eval"]["status"] == "ok" and got["eval"]["result"]["ratio"] == 2.0  # after a kill, a failure
    assert got["too_big"]["status"].startswith("skipped: ") and "at least 1000 s" in got["too_big"]["status"]

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [p["status"] for p in on_disk["parts"]] == [p["status"] for p in results["parts"]]
    md = (tmp_path / "results.md").read_text()
    assert "| – | `default` | 12 GiB |" in md and "not run: part cut at budget" in md
    assert "| `seed` | 12 GiB (n/a on CPU) |" in md  # bench_train's caps are CUDA allocator caps
    assert "| `generate_texts` (batch 16, KV cache) | 4 | 1.00 | 4.00 | 2.00× | 4/4 |" in md


def _row(recipe: str, sps: float, **kw) -> dict:
    precision = {"seed": "seed_bf16", "fp32_master": "fp32_master"}.get(recipe.split(":")[0], "bf16_lean")
    return {"recipe": recipe, "bxa": "8x2", "gc": True, "status": "ok", "steps": 10, "timed_steps": 10,
            "samples_per_s": sps, "tokens_per_s": 250 * sps, "peak_gib": 10.5, "reserved_gib": 11.0,
            "mfu": 0.2, "device": "cuda (NVIDIA H100 80GB HBM3)", "check": {"ok": True},
            "settings": {"precision": precision, "min_pixels": None}} | kw


def test_tables_render_cuts_mismatches_and_the_train_sh_choice() -> None:
    results = {"suite": {"mode": "gpu", "config": "full", "status": "ok", "started_utc": "2026-12-01",
                         "budget_s": 540, "elapsed_s": 500, "device": "cuda (NVIDIA H100 80GB HBM3)",
                         "versions": {"torch": "2.11", "transformers": "5.24.0"}},
               "parts": [
                   {"name": "train_12gb", "kind": "train", "status": "ok", "memory_cap_gb": 12,
                    "recipes": ["seed", "default", "default_nogc:bs=2,ga=8"],
                    "rows": [_row("seed", 2.0), _row("default", 5.0),
                             _row("default_nogc:bs=2,ga=8", 0, status="OOM at cap")]},
                   {"name": "train_uncapped", "kind": "train", "status": "cut at budget",
                    "memory_cap_gb": None,
                    "recipes": ["default:bs=16,ga=1", "fp32_master:bs=16,ga=1", "default_nogc"],
                    "rows": [_row("default:bs=16,ga=1", 8.0, timed_steps=4, peak_gib=30.0),
                             _row("fp32_master:bs=16,ga=1", 9.0, check={"ok": False})]},
               ]}
    table = gpu_tables.train_table(results)
    line = {row.split("|")[2].strip(): row for row in table.splitlines()[2:]}
    assert "| 5.00 | 1250 | 10.50 | 20.0 % | 2.50× | OK | ok |" in line["`default`"]
    assert "| 12 GiB |" in line["`default`"] and "NVIDIA H100 80GB HBM3" in line["`default`"]
    assert line["`default_nogc:bs=2,ga=8`"].endswith("| – | – | 10.50 | – | – | OK | OOM at cap |")
    assert line["`default:bs=16,ga=1`"].endswith("| 4.00× | OK | ok, 4/10 steps (time budget) |")
    assert "**MISMATCH**" in line["`fp32_master:bs=16,ga=1`"]
    assert line["`default_nogc`"].endswith("| not run: part cut at budget |")
    choice = gpu_tables.choice(results)  # the mismatching fp32 row is no candidate, however fast
    assert choice[0].startswith("cards under 20 GB: `default` (5.00 samples/s under the 12 GiB cap")
    assert choice[1].startswith("cards of 20 GB and more: `default:bs=16,ga=1` (8.00 samples/s, peak 30.00")

    text = "a\n<!-- gpu-table:train -->\nold\n<!-- /gpu-table:train -->\nb\n"
    once = gpu_tables.replace_blocks(text, {"train": "new"})
    assert once == "a\n<!-- gpu-table:train -->\nnew\n<!-- /gpu-table:train -->\nb\n"
    assert gpu_tables.replace_blocks(once, {"train": "new"}) == once
    with pytest.raises(ValueError, match="gpu-table:eval"):
        gpu_tables.replace_blocks(text, {"eval": "new"})


def test_rope_pairs_match_twins_only() -> None:
    def row(recipe: str, sps: float, rope: bool, bs: int = 8, cap: float | None = 12) -> dict:
        return _row(recipe, sps, memory_cap_gb=cap, settings={"name": recipe, "precision": "bf16_lean",
                                                               "bs": bs, "rope": rope})

    on, off = row("default", 6.0, True), row("default:rope=0", 4.0, False)
    others = [row("default:bs=16,ga=1", 9.0, True, bs=16),  # another shape: no twin of `off`
              row("default:rope=0", 5.0, False, cap=None),  # another memory cap: no twin either
              row("seed", 2.0, False) | {"settings": {"precision": "seed_bf16", "rope": False}}]
    assert gpu_tables.rope_pairs([on, off, *others]) == [(on, off)]
    table = gpu_tables.rope_table({"parts": [{"name": "t", "kind": "train", "status": "ok",
                                              "memory_cap_gb": 12, "recipes": ["default", "default:rope=0"],
                                              "rows": [on, off]}]})
    assert table.splitlines()[2] == ("| NVIDIA H100 80GB HBM3 | 12 GiB | `default` | 6.00 | `default:rope=0` "
                                     "| 4.00 | 1.50× |")


def test_12gb_pick_names_the_batch_that_holds_the_longest_crop() -> None:
    """The pick for cards under 20 GB, timed under the 11 GiB cap, says by memory_plan.py whether it holds
    the suite's longest crop (every row padded to it) at its batch, else the largest batch that does."""
    crop = {"id": "x", "width": 1098, "height": 1019, "length": 1529, "image_tokens": 1404}
    results = {"suite": {"mode": "gpu", "config": "full", "fixtures": {"longest_crop": crop}},
               "parts": [{"name": "train_12gb", "kind": "train", "status": "ok", "memory_cap_gb": 11,
                          "recipes": ["default"], "rows": [_row("default", 5.0) | {"settings": {
                              "precision": "bf16_lean", "bs": 8, "ga": 2, "gc": True}}]}]}
    line = gpu_tables.choice(results)[0]
    batch = int(line.split("fits at batch ")[1].split()[0])
    assert 1 <= batch < 8 and f"BATCH_SIZE={batch} GRAD_ACCUM={16 // batch}" in line

    def gib(b: int) -> float:
        return gpu_tables._planned_gib("bf16_lean", b, crop["length"], crop["image_tokens"], True)

    assert gib(batch) <= 11 < gib(batch + 1) and f"{gib(8):.2f} GiB at batch 8" in line


def test_gpu_plan_fits_six_minutes_on_an_h200() -> None:
    """The shares are planned seconds on an H200: with set-up and the reserve they fit the budget, and every
    part's planned slot holds its minimum. The rope comparison runs right after `default`, early."""
    parts = gpu_suite.suite_parts("gpu")
    assert gpu_suite.BUDGET_S["gpu"] <= 360
    assert gpu_suite.planned_s(parts, "gpu") <= gpu_suite.BUDGET_S["gpu"]
    assert all(p.min_s <= p.share for p in parts)
    assert parts[0].memory_cap_gb <= 11.76 - 0.3  # an RTX 3060 reports 11.76 GiB; its context takes 0.3+
    first = parts[0].recipes
    assert first[first.index("default:bs=2,ga=8") + 1] == "default:bs=2,ga=8,rope=0"


def test_recipes_are_read_without_importing_torch() -> None:
    assert gpu_suite.bench_train_recipes() == set(bench_train.PRESETS)


def test_bench_train_deadline_skips_and_cuts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A deadline reached before a recipe skips it; one reached after a timed step ends its timing."""
    threads = torch_threads()
    out = tmp_path / "rows.json"
    argv = ["--config", "tiny", "--recipe", "default", "seed", "--steps", "5", "--warmup", "0",
            "--books", "1", "--pages", "2", "--num_workers", "0", "--json", str(out), "--deadline", "1000"]
    calls = itertools.count()  # the first reading lets `default` start; it then times one step and stops
    clock = SimpleNamespace(time=lambda: 0.0 if next(calls) == 0 else 2000.0, perf_counter=time.perf_counter)
    monkeypatch.setattr(bench_train, "time", clock)
    try:
        assert bench_train.main(argv) == 0
    finally:
        torch_threads(threads)
    rows = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert rows["default"]["status"] == "ok" and rows["default"]["timed_steps"] == 1
    assert rows["default"]["steps"] == 5 and rows["default"]["samples_per_s"] > 0
    assert rows["seed"]["status"] == "skipped: time budget" and "samples_per_s" not in rows["seed"]


def torch_threads(n: int | None = None) -> int:
    import torch

    if n is not None:
        torch.set_num_threads(n)  # bench_train.main pins CPU runs to one thread
    return torch.get_num_threads()


def test_bench_eval_seed_loop_stops_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def seed_loop(model, processor, images: list, max_new_tokens: int) -> list[str]:
        calls.append(len(images))
        return ["t"] * len(images)

    monkeypatch.setattr(bench_eval, "seed_loop", seed_loop)
    images = list(range(40))
    assert len(bench_eval.seed_loop_until(None, None, images, 4, deadline=None)) == 40 and calls == [40]
    calls.clear()
    assert len(bench_eval.seed_loop_until(None, None, images, 4, deadline=time.time() + 3600)) == 40
    assert calls == [16, 16, 8]
    calls.clear()
    assert bench_eval.seed_loop_until(None, None, images, 4, deadline=0.0) == ["t"] * 16 and calls == [16]


def test_image_plus_carried_wheels_meet_every_need_of_requirements() -> None:
    """The preflight's static part, no download: requirements.txt, and the Requires-Dist of each wheel in the
    committed lock, against gpu_image.txt plus the lock. jaconv was the suite's first abort on the image."""
    lock, image = gpu_carry.read_lock(), gpu_carry.read_image()
    assert gpu_carry.static_unmet(gpu_carry.read_requirements(), image, lock) == []
    carried = {c["name"]: c["version"] for c in lock["carried"]}
    lacking = {"jaconv", "editdistance", "torch-optimi", "python-dotenv"}  # absent from the image
    assert lacking | gpu_carry.CARRY_UNLISTED <= set(carried)
    assert carried["transformers"] == gpu_carry.PINS["transformers"] and "huggingface-hub" not in carried
    assert "wordfreq" in lock["left_out"] and "wordfreq" not in carried


def fake_wheels(tmp_path: Path, requires: dict[str, tuple[str, list[str]]]):
    """A download() for gpu_carry.resolve that writes a wheel holding only METADATA, from {name: (version,
    Requires-Dist)}, whatever spec it is asked for; it records the specs asked."""
    asked: list[str] = []

    def download(spec: str) -> Path:
        asked.append(spec)
        name = gpu_carry.Requirement(spec).name
        version, reqs = requires[gpu_carry.canonicalize_name(name)]
        stem = f"{name.replace('-', '_')}-{version}"
        wheel = tmp_path / f"{stem}-py3-none-any.whl"
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        meta += "".join(f"Requires-Dist: {r}\n" for r in reqs) + "\nlong description: Requires-Dist: x\n"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{stem}.dist-info/METADATA", meta)
        return wheel

    return download, asked


def test_carried_set_is_derived_from_requirements_and_wheel_metadata(tmp_path: Path) -> None:
    """Resolving again from the lock's own metadata gives the lock's set, and a need the image fails pulls in
    its wheel, recursively; markers are evaluated for CPython 3.12 on Linux."""
    lock, image = gpu_carry.read_lock(), gpu_carry.read_image()
    meta = {c["name"]: (c["version"], c["requires"]) for c in lock["carried"]}
    download, _ = fake_wheels(tmp_path, meta)
    prefer = {n: v for n, (v, _) in meta.items()}
    got = gpu_carry.resolve(gpu_carry.read_requirements(), image, download, gpu_carry.PINS, prefer)
    assert {n: c.version for n, c in got.items()} == prefer

    # hub too old on a doctored image: transformers' need carries hub, and hub's own need its wheel
    doctored = dict(image, **{"huggingface-hub": "1.0.0"})
    meta |= {"huggingface-hub": ("1.40.0", ["new-dep>=2", "win-only; sys_platform == 'win32'",
                                            "old-py; python_version < '3.10'"]),
             "new-dep": ("2.1", [])}
    download, asked = fake_wheels(tmp_path, meta)
    got = gpu_carry.resolve(gpu_carry.read_requirements(), doctored, download, gpu_carry.PINS, prefer)
    tf = f"transformers {gpu_carry.PINS['transformers']}"
    hub = next(r for r in meta["transformers"][1] if r.startswith("huggingface-hub"))
    hub = str(gpu_carry.Requirement(hub))
    assert got["huggingface-hub"].why[0] == f"{tf}: {hub} (the image has 1.0.0)"
    assert "new-dep" in got and "win-only" not in got and "old-py" not in got
    assert hub in asked and f"transformers=={gpu_carry.PINS['transformers']}" in asked


def test_an_unmet_need_is_named_and_fatal(tmp_path: Path) -> None:
    """A doctored image (old hub) and lock (jaconv not carried): gpu_carry.py check exits 1 naming each."""
    image, text = tmp_path / "image.txt", gpu_carry.IMAGE.read_text()
    hub_line = next(line for line in text.splitlines() if line.startswith("huggingface-hub=="))
    image.write_text(text.replace(hub_line, "huggingface-hub==1.0.0"))
    lock = gpu_carry.read_lock()
    lock["carried"] = [c for c in lock["carried"] if c["name"] != "jaconv"]
    lock_path = tmp_path / "lock.json"
    lock_path.write_text(json.dumps(lock))
    script = ROOT / "benchmarks" / "gpu_carry.py"
    cmd = [sys.executable, str(script), "check", "--image", str(image), "--lock", str(lock_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    jaconv = next(r for r in gpu_carry.read_requirements() if r.name == "jaconv")
    transformers = next(c for c in lock["carried"] if c["name"] == "transformers")
    hub = next(r for r in transformers["requires"] if r.startswith("huggingface-hub"))
    hub = str(gpu_carry.Requirement(hub))
    assert f"unmet: requirements.txt needs {jaconv}: not installed" in proc.stderr
    assert f"unmet: transformers {transformers['version']} needs {hub}: found 1.0.0" in proc.stderr
    assert "2 need(s) unmet" in proc.stderr
    good = subprocess.run([sys.executable, str(script), "check"], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr


def test_suite_stops_before_any_part_naming_each_unmet_need(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("packaging>=1\njaconv>=99  # newer than any\nno-such-package-xyz>=1\nwordfreq>=99\n")
    monkeypatch.setattr(gpu_suite, "REQUIREMENTS", reqs)
    monkeypatch.setattr(gpu_suite, "run_suite", lambda *a, **k: pytest.fail("a part ran"))
    assert gpu_suite.main([str(tmp_path / "out"), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "unmet: requirements.txt needs jaconv>=99: found" in err
    assert "unmet: requirements.txt needs no-such-package-xyz>=1: not installed" in err
    assert "wordfreq" not in err  # left out on purpose (gpu_carry.LEFT_OUT), never checked
    suite = json.loads((tmp_path / "out" / "results.json").read_text())["suite"]
    assert suite["status"].startswith("aborted: 2 unmet need(s)") and len(suite["unmet"]) == 2


def test_preflight_fails_when_the_carried_folder_is_not_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """.whl/ is ignored by git and outlives a lock change: a stale one (a wheel missing, an old version
    beside) passed the preflight, which installs the lock's set, and would stop the suite on the GPU."""
    import gpu_preflight

    lock = gpu_carry.read_lock()
    wheels = [c["wheel"] for c in lock["carried"]]
    carried = tmp_path / ".whl"
    (carried / "fonts").mkdir(parents=True)
    (carried / "fonts" / "cjk.ttf").write_bytes(b"font")
    for name in wheels:
        (carried / name).write_bytes(b"wheel")
    assert gpu_preflight.carried_problems(carried, lock) == []

    (carried / wheels[0]).unlink()
    (carried / "peft-0.1.0-py3-none-any.whl").write_bytes(b"old")
    monkeypatch.setattr(gpu_preflight, "CARRIED", carried)
    monkeypatch.setattr(gpu_preflight, "build_twin", lambda *a: pytest.fail("the twin was built"))
    assert gpu_preflight.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"missing {wheels[0]}" in err and "peft-0.1.0-py3-none-any.whl" in err and "gpu_wheels.sh" in err
    assert len(err.strip().splitlines()) == 1
