"""model.vision_runtime: the vision tower on OpenVINO / ONNX Runtime gives PyTorch's image features and texts;
model.cpu_threads: CPU inference uses the physical cores unless the user chose."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paddleocr_vl_manga.model import cpu_threads
from paddleocr_vl_manga.model.loading import ModelLoadError, load_for_inference, load_model_and_processor
from paddleocr_vl_manga.model.vision_runtime import (
    VisionCore,
    VisionRuntimeError,
    attach_vision_runtime,
    grid_inputs,
    require,
)

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ("openvino", "onnxruntime")
# fp32 graphs reorder float sums only; int8 weights (and ONNX Runtime's per-call int8 activations) move
# features by up to ~4 % of their largest magnitude on the tiny model (measured 1.1 % OpenVINO, 3.8 % ONNX
# Runtime): the tolerance is 1e-5 and 10 % of max |feature|, relative.
TOLERANCE = {False: 1e-5, True: 0.10}


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


# OpenVINO's and ONNX Runtime's native thread pools outlive the objects that started them. In the suite's one
# long-lived process that crashed it (SIGSEGV, no Python traceback) a few tests later, in CI and here: every
# test that builds a graph runs in a child pytest process of its own, started by the test below.
CHILD_ENV = "PADDLEOCR_VL_MANGA_RUNTIME_TESTS"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
builds_a_graph = pytest.mark.skipif(not IN_CHILD, reason="builds a native graph: run in a child process by "
                                    "test_the_graph_building_tests_pass_in_a_process_of_their_own")


def test_the_graph_building_tests_pass_in_a_process_of_their_own() -> None:
    if IN_CHILD:
        pytest.skip("this is that process")
    if not any(installed(r) for r in COMPILED):
        pytest.skip("neither openvino nor onnxruntime is installed (optional)")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "compiled_tower or compiled_fp32_tower or int8_build_warns"],
        env={**os.environ, CHILD_ENV: "1"}, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " failed" not in child.stdout, child.stdout[-2000:]


@pytest.fixture(scope="module")
def model_and_inputs(tiny_model: Path) -> tuple:
    """The tiny model and two random crops of different grids (6 x 12 and 16 x 6 patches)."""
    model, processor = load_model_and_processor(tiny_model, dtype=torch.float32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for h, w in ((40, 90), (130, 40))]
    inputs = processor.image_processor(images, return_tensors="pt")
    return model, inputs["pixel_values"], inputs["image_grid_thw"]


def features(model: object, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output)


def test_vision_core_computes_the_transformers_tower(model_and_inputs: tuple) -> None:
    model, pixel_values, grid = model_and_inputs
    assert len({tuple(g) for g in grid.tolist()}) == 2, "two grids: the merge order and positions differ"
    core = VisionCore(model.model.visual, model.model.projector).eval()
    parts, start = [], 0
    with torch.no_grad():
        for g in grid:
            n = int(g.prod())
            parts.append(core(pixel_values[start : start + n], *grid_inputs(core, g)))
            start += n
    expected = features(model, pixel_values, grid)
    torch.testing.assert_close(torch.cat(parts), expected, atol=1e-5, rtol=1e-5)


@builds_a_graph
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("runtime", COMPILED)
def test_compiled_tower_gives_pytorch_features(model_and_inputs: tuple, runtime: str, int8: bool) -> None:
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed (optional: pip install {runtime})")
    model, pixel_values, grid = model_and_inputs
    expected = features(model, pixel_values, grid)
    compiled = attach_vision_runtime(copy.deepcopy(model), runtime, int8=int8, threads=1)
    assert len(compiled.model.visual.vision_model.encoder.layers) == 0, "the PyTorch tower was not released"
    got = features(compiled, pixel_values, grid)
    assert got.shape == expected.shape
    error = (got - expected).abs().max().item() / expected.abs().max().item()
    assert error <= TOLERANCE[int8], f"{runtime} {'int8' if int8 else 'fp32'}: relative error {error:.4f}"


@builds_a_graph
@pytest.mark.parametrize("runtime", COMPILED)
def test_manga_ocr_reads_the_same_texts_with_a_compiled_fp32_tower(tiny_model: Path, runtime: str) -> None:
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed (optional: pip install {runtime})")
    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

    rng = np.random.default_rng(1)
    crops = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
             for h, w in ((40, 90), (90, 30))]
    torch_texts = MangaOcr(tiny_model, force_cpu=True, raw=True, max_new_tokens=8).batch(crops)
    mocr = MangaOcr(tiny_model, raw=True, max_new_tokens=8, vision_runtime=runtime)
    assert hasattr(mocr.model.model, "vision_runtime")
    assert mocr.batch(crops) == torch_texts


def test_missing_runtime_package_is_one_line_naming_the_install(monkeypatch: pytest.MonkeyPatch,
                                                                tiny_model: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ImportError) as e:
        require("openvino")
    assert "pip install openvino" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="pip install openvino"):
        load_for_inference(str(tiny_model), vision_runtime="openvino")
    with pytest.raises(VisionRuntimeError, match="unknown vision runtime"):
        require("tensorrt")


def test_predict_vision_runtime_flag_without_the_package_is_one_error_line(tiny_model: Path,
                                                                           tmp_path: Path) -> None:
    crop = tmp_path / "crop.png"
    Image.new("RGB", (40, 30), "white").save(crop)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "openvino.py").write_text("raise ImportError('no openvino here')\n")
    env = {"PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "predict.py", "--model_path", str(tiny_model), str(crop),
                             "--vision_runtime", "openvino"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install openvino" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cpu_threads_default_to_physical_cores_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cpu_threads, "physical_cores", lambda: 1)
        monkeypatch.setattr(cpu_threads, "torch_default_threads", lambda: 3)
        torch.set_num_threads(3)  # torch's own default (mocked: 3 logical CPUs, 1 core)
        assert cpu_threads.use_physical_cores() == 1 == torch.get_num_threads()
        torch.set_num_threads(2)  # the user's own choice is kept
        assert cpu_threads.use_physical_cores() == 2 == torch.get_num_threads()
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # so is the environment's
        assert cpu_threads.use_physical_cores() == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_physical_cores_counts_cores_not_smt_siblings() -> None:
    cores = cpu_threads.physical_cores()
    assert 1 <= cores <= cpu_threads.torch_default_threads()


@builds_a_graph
@pytest.mark.parametrize("runtime", [r for r in COMPILED if installed(r)])
def test_int8_build_warns_before_it_starts_when_memory_looks_short(model_and_inputs: tuple, runtime: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The full-size tower's int8 build passed 14 GB resident (docs/inference.md): on a 16 GB laptop it is
    # killed after minutes. The warning must come before the build, and only where memory looks short.
    import paddleocr_vl_manga.model.vision_runtime as vision_runtime

    model = copy.deepcopy(model_and_inputs[0])
    tower_bytes = sum(p.numel() * p.element_size() for p in model.model.visual.parameters())
    monkeypatch.setattr(vision_runtime, "available_memory", lambda: tower_bytes)
    with pytest.warns(UserWarning, match="memory") as caught:
        attach_vision_runtime(model, runtime, int8=True)
    assert "--quantize int8" in str(caught[0].message)
    monkeypatch.setattr(vision_runtime, "available_memory", lambda: 1000 * tower_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        attach_vision_runtime(copy.deepcopy(model_and_inputs[0]), runtime, int8=True)


@pytest.mark.parametrize("cpu_max, cores", [("100000 100000", 1), ("150000 100000", 2), ("max 100000", None)])
def test_physical_cores_stay_within_a_containers_cpu_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           cpu_max: str, cores: int | None) -> None:
    # docker --cpus=1 on a many-core host: every thread past the quota only waits for the CFS throttle
    unlimited = cpu_threads.physical_cores()
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(cpu_threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert cpu_threads.physical_cores() == min(unlimited, cores or unlimited)
