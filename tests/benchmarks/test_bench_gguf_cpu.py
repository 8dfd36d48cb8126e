"""benchmarks/bench_gguf_cpu.py without llama.cpp: its arguments, the no-build path, the command it runs and
the log it reads. CI never compiles llama.cpp (the benchmark does, once, on request)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gguf_cpu  # noqa: E402


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No llama.cpp build anywhere: the cache under an empty XDG_CACHE_HOME, no LLAMA_MTMD_CLI."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_MTMD_CLI", raising=False)
    return tmp_path


def test_no_build_names_the_cache_and_what_to_do(empty_cache: Path, error_line: Callable[[int], str]) -> None:
    line = error_line(bench_gguf_cpu.main(["--no_build", "--check_only"]))
    assert "llama-mtmd-cli is not built in" in line and str(empty_cache) in line
    assert "--no_build" in line and "LLAMA_MTMD_CLI" in line
    assert not any(empty_cache.rglob("*")), "nothing may be fetched or built with --no_build"


def test_build_cache_sits_beside_the_converter_cache(empty_cache: Path) -> None:
    from paddleocr_vl_manga.export.gguf import LLAMA_CPP_PYTHON, default_cache

    assert bench_gguf_cpu.build_cache() == default_cache().parent / f"llama.cpp-{LLAMA_CPP_PYTHON}-build"
    assert bench_gguf_cpu.build_cache().is_relative_to(empty_cache)


def test_llama_mtmd_cli_must_be_an_executable(empty_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                               error_line: Callable[[int], str]) -> None:
    monkeypatch.setenv("LLAMA_MTMD_CLI", str(empty_cache / "nowhere" / "llama-mtmd-cli"))
    assert "LLAMA_MTMD_CLI=" in error_line(bench_gguf_cpu.main(["--check_only"]))


@pytest.mark.parametrize("argv", [["--num_samples", "0"], ["--max_new_tokens", "-1"], ["--min_pixels", "0"],
                                  ["--check_only", "--skip_check"]])
def test_bad_arguments_fail_before_any_build(argv: list[str], empty_cache: Path,
                                             error_line: Callable[[int], str]) -> None:
    # Without --no_build too: a bad argument must not cost a compile first.
    assert error_line(bench_gguf_cpu.main(argv)).startswith("error: --")
    assert not any(empty_cache.rglob("*"))


def test_defaults() -> None:
    a = bench_gguf_cpu.parse_args([])
    assert a.gguf_types == ["q8_0"] and a.max_new_tokens == 16 and a.num_samples == 6
    assert a.min_pixels == [147384]  # the v1 release's image processor
    assert bench_gguf_cpu.parse_args(["--gguf_types", "q8_0", "f16"]).gguf_types == ["q8_0", "f16"]


def test_the_cli_call_is_greedy_forced_length_and_our_prompt(tmp_path: Path) -> None:
    from paddleocr_vl_manga.data.dataset import PROMPT

    runner = bench_gguf_cpu.LlamaCli(Path("/bin/llama-mtmd-cli"), tmp_path / "m.gguf", tmp_path / "p.gguf",
                                     threads=3, max_new_tokens=16, workdir=tmp_path)
    cmd = runner.command(tmp_path / "crop.png")
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert pairs["-p"] == PROMPT and pairs["-n"] == "16" and pairs["--temp"] == "0"
    assert pairs["-t"] == pairs["-tb"] == "3" and pairs["--mmproj"] == str(tmp_path / "p.gguf")
    assert "--ignore-eos" in cmd and "-v" not in cmd
    assert "-v" in runner.command(tmp_path / "crop.png", verbose=True)


# The lines of a real llama-mtmd-cli call at -lv 4 (the pinned llama.cpp, the tiny model), others left out.
LOG = """\
0.00.817.476 I main: loading model: tiny-gguf/model-f16.gguf
0.00.817.921 W WARN: This is an experimental CLI for testing multimodal capability.
0.00.817.928 W       For normal use cases, please use the standard llama-cli
0.00.824.742 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.00.847.873 I mtmd batch encoding done in 23 ms
0.00.847.920 I decoding image batch 1/1, n_tokens_batch = 208
0.00.850.219 I image decoded (batch 1/1) in 3 ms
1.02.869.710 I llama_perf_context_print:        load time =     249.11 ms
1.02.869.720 I llama_perf_context_print: prompt eval time =      27.89 ms /   221 tokens (0.13 ms per token)
1.02.869.723 I llama_perf_context_print:        eval time =      12.37 ms /    15 runs (0.82 ms per token)
1.02.869.724 I llama_perf_context_print:       total time =      80.94 ms /   236 tokens
"""


def test_parse_log_reads_the_split_and_the_timestamps() -> None:
    t = bench_gguf_cpu.parse_log(LOG)
    assert t.ready == pytest.approx(0.817921)
    assert t.work == pytest.approx(62.869710 - 0.817921)  # "1.02.869.710" is 1 min 2.869710 s
    assert (t.encode, t.prompt_eval, t.eval) == pytest.approx((0.023, 0.02789, 0.01237))
    assert (t.prompt_tokens, t.eval_runs, t.image_tokens) == (221, 15, 208)


def test_parse_log_names_a_missing_line() -> None:
    broken = LOG.replace("mtmd batch encoding done in 23 ms", "something else")
    with pytest.raises(bench_gguf_cpu.BenchError, match="mtmd batch encoding done"):
        bench_gguf_cpu.parse_log(broken)


def test_runner_split_is_the_logged_work(tmp_path: Path) -> None:
    runner = bench_gguf_cpu.LlamaCli(Path("cli"), Path("m"), Path("p"), threads=1, max_new_tokens=16,
                                     workdir=tmp_path)
    runner.timings.append(bench_gguf_cpu.parse_log(LOG))
    split = runner.split(wall=99.0)  # the process's wall time (start, loading) is not the crop's
    assert split.steps == 16  # the first token from the prefill, 15 decode forwards
    assert split.total == pytest.approx(62.869710 - 0.817921)
    assert split.prefill == pytest.approx(0.02789 - 0.023)  # its clock spans the image encode
    assert split.other == pytest.approx(split.total - 0.023 - split.prefill - 0.01237)
