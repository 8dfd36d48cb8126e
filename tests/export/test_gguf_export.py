"""export_model.py --gguf: llama.cpp's converter (ocr_gguf) on an export of a release-like checkpoint, the
chat template's image marker, and --base read from the checkpoint.

The conversion tests need the converter in the cache (`make setup`, or
`python -m paddleocr_vl_manga.export.gguf --fetch`) or
LLAMA_CPP_DIR; they skip without it (no network in tests). The rest runs anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

import paddleocr_vl_manga.export.gguf as ocr_gguf
import paddleocr_vl_manga.export.layout as export_model
import paddleocr_vl_manga.train.run as sft
from paddleocr_vl_manga.data.collator import IMAGE_TRIPLET, PROMPT
from tools.make_tiny_model import build_release_like

TRAINED_PIXELS = (3136, 50176)  # not the v1.5 base's 112896 / 1003520: the mmproj must carry these


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """The converter's folder; the test skips (before training anything) without one."""
    try:
        return ocr_gguf.converter_dir()
    except ocr_gguf.GGUFError as e:
        pytest.skip(f"no llama.cpp converter: {e}")


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release-like v1.5 base with the release's tokenizer.model, and 3 vision layers: the converter maps
    the projector's mlp_AR.linear_{1,2} through its per-layer table, which needs as many encoder layers."""
    out = tmp_path_factory.mktemp("gguf_base")
    return Path(build_release_like(out, "v1.5", vision_layers=3, sentencepiece_model=True))


@pytest.fixture(scope="module")
def run_dir(gguf_base: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One training step from gguf_base at other pixel bounds, saved as checkpoint-1 (read-only)."""
    out = tmp_path_factory.mktemp("gguf_sft") / "run"
    rc = sft.main([
        "--model_path", str(gguf_base), "--data_dir", str(prepared), "--output_dir", str(out),
        "--max_steps", "1", "--max_train_samples", "2", "--eval_strategy", "no", "--save_strategy", "steps",
        "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-2",
        "--min_pixels", str(TRAINED_PIXELS[0]), "--max_pixels", str(TRAINED_PIXELS[1]),
    ])
    assert rc == 0
    return out


def render(template: str, content, **env) -> str:
    """The generation prompt for one user turn, as llama.cpp's jinja would render it (whitespace control
    in the template is explicit, so trim_blocks/lstrip_blocks must not matter)."""
    return jinja2.Environment(**env).from_string(template).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True,
        bos_token="<s>", eos_token="</s>",
    )


def check_template(template: str, prompt: str) -> None:
    """Every way llama.cpp hands over an image gives our training prompt once mtmd replaces the marker by
    <|IMAGE_START|> (embeddings) <|IMAGE_END|> (the embeddings stand where <|IMAGE_PLACEHOLDER|> is)."""
    server = "<__media_1a2b__>"  # llama-server's per-process random marker
    cases = {
        "llama-mtmd-cli": (ocr_gguf.MEDIA_MARKER + PROMPT, ocr_gguf.MEDIA_MARKER),
        "llama-server, parts joined": (server + PROMPT, server),
        "llama-server, typed parts": ([{"type": "media_marker", "text": server},
                                       {"type": "text", "text": PROMPT}], server),
        "HF-style messages": ([{"type": "image"}, {"type": "text", "text": PROMPT}], ocr_gguf.MEDIA_MARKER),
        "text before image": ([{"type": "text", "text": PROMPT}, {"type": "image"}], ocr_gguf.MEDIA_MARKER),
    }
    for env in ({}, {"trim_blocks": True, "lstrip_blocks": True}):
        for case, (content, marker) in cases.items():
            rendered = render(template, content, **env)
            assert rendered.count(marker) == 1, (case, rendered)
            assert rendered.replace(marker, IMAGE_TRIPLET) == prompt, (case, env)


@pytest.mark.parametrize("version", ["v1", "v1.5"])
def test_gguf_template_renders_the_training_prompt(release_model, version: str) -> None:
    prompt, processor = ocr_gguf.training_prompt(Path(release_model(version)))
    assert prompt.endswith("Assistant: " if version == "v1" else "Assistant:\n")
    template = ocr_gguf.gguf_chat_template(prompt, processor.tokenizer.eos_token)
    check_template(template, prompt)
    # A whole exchange ends the answer with eos, as training labels it.
    messages = [{"role": "user", "content": ocr_gguf.MEDIA_MARKER + PROMPT},
                {"role": "assistant", "content": "テスト"}]
    full = jinja2.Environment().from_string(template).render(messages=messages)
    assert full.replace(ocr_gguf.MEDIA_MARKER, IMAGE_TRIPLET) == prompt + "テスト</s>"


def test_documented_mtmd_cli_commands_use_jinja() -> None:
    # llama-mtmd-cli defaults to --no-jinja (common/arg.cpp, LLAMA_EXAMPLE_MTMD), and llama.cpp's built-in
    # template detection (src/llama-chat.cpp) knows no PaddleOCR-VL layout: without --jinja it refuses the
    # GGUF's template ("this custom template is not supported, try using --jinja").
    root = Path(__file__).resolve().parents[2]
    commands = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        lines = text.splitlines()
        commands += [(page.name, line) for line in lines if line.lstrip().startswith("llama-mtmd-cli")]
    assert commands
    for page, line in commands:
        assert " --jinja" in line, (page, line)


def expected_tensors(llama_cpp: Path, folder: Path) -> dict[str, list[str]]:
    """{"model": names, "mmproj": names}: the GGUF names the converter's own classes and tensor tables give
    the folder's safetensors (in a subprocess: the converter's `gguf` and `conversion` packages)."""
    script = """
import json, sys
from pathlib import Path
from safetensors import safe_open
import gguf
from conversion.ernie import PaddleOCRModel, PaddleOCRVisionModel
folder = Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
with safe_open(str(folder / "model.safetensors"), "pt") as f:
    names = list(f.keys())
out = {}
for key, cls, blocks in (("model", PaddleOCRModel, config["num_hidden_layers"]),
                         ("mmproj", PaddleOCRVisionModel, config["vision_config"]["num_hidden_layers"])):
    table = gguf.get_tensor_name_map(cls.model_arch, blocks)
    kept = [cls.filter_tensors((n, None)) for n in names]
    out[key] = sorted(table.get_name(k[0], try_suffixes=(".weight", ".bias")) for k in kept if k)
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama_cpp / "gguf-py"), str(llama_cpp)]))
    done = subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def read_gguf(llama_cpp: Path, path: Path) -> dict:
    """Tensor names and types and the metadata this test checks, read with the converter's gguf library."""
    script = """
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
fields = {k: f.contents() for k, f in r.fields.items()
          if k != "tokenizer.ggml.scores" and not k.startswith("GGUF.")}
tokens = fields.pop("tokenizer.ggml.tokens", None)
types = fields.pop("tokenizer.ggml.token_type", None)
if tokens:
    fields["tokens"] = {str(i): [tokens[i], types[i]] for i in (0, 1, 2, 23, 100273, 100295, 101305, 101306)}
print(json.dumps({"tensors": {t.name: t.tensor_type.name for t in r.tensors},
                  "row": {t.name: int(t.shape[0]) for t in r.tensors}, "fields": fields}))
"""
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"))
    done = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_checkpoint_to_gguf_without_base(llama_cpp: Path, run_dir: Path, tmp_path: Path, capsys) -> None:
    """The checkpoint names its base; --gguf writes both files, whose tensors are what the converter maps,
    whose chat template gives our training prompt, and whose mmproj has the trained pixel bounds."""
    out = tmp_path / "ft"
    assert export_model.main([str(run_dir / "checkpoint-1"), "--out", str(out), "--gguf"]) == 0
    model, mmproj = out / "model-f16.gguf", out / "mmproj-f16.gguf"
    assert capsys.readouterr().out.split() == [str(out), str(model), str(mmproj)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    want = expected_tensors(llama_cpp, out)
    lm, mm = read_gguf(llama_cpp, model), read_gguf(llama_cpp, mmproj)
    assert sorted(lm["tensors"]) == want["model"] and len(want["model"]) == 3 + 2 * 9
    assert sorted(mm["tensors"]) == want["mmproj"] and len(want["mmproj"]) > 3 * 16
    assert {t for t in lm["tensors"].values()} == {"F16", "F32"}  # norms stay F32

    assert (mm["fields"]["clip.vision.image_min_pixels"], mm["fields"]["clip.vision.image_max_pixels"]) \
        == TRAINED_PIXELS
    assert mm["fields"]["clip.projector_type"] == "paddleocr"

    f = lm["fields"]
    prompt, _ = ocr_gguf.training_prompt(out)
    check_template(f["tokenizer.chat_template"], prompt)
    # As transformers tokenizes the prompt: no <s> first, no "▁" before text after a special token.
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_space_prefix"]) == (False, False)
    control, byte = 3, 6  # gguf.TokenType
    assert f["tokens"] == {"0": ["<unk>", control], "1": ["<s>", control], "2": ["</s>", control],
                           "23": ["<0x0A>", byte], "100273": ["<|begin_of_sentence|>", control],
                           "100295": ["<|IMAGE_PLACEHOLDER|>", control],
                           "101305": ["<|IMAGE_START|>", control], "101306": ["<|IMAGE_END|>", control]}
    assert f["general.name"] == "Ft"

    # q8_0: the same tensors; every F16 one whose rows split into 32-value blocks is Q8_0, the rest stay
    # (the converter falls back per tensor: the 14-wide patch embedding here, at full size also the vision
    # MLP's 4304-wide rows).
    q8 = ocr_gguf.export_gguf(out, tmp_path / "q8", "q8_0")
    assert [p.name for p in q8] == ["model-q8_0.gguf", "mmproj-q8_0.gguf"]
    lm8, mm8 = (read_gguf(llama_cpp, p) for p in q8)
    assert lm8["tensors"].keys() == lm["tensors"].keys() and mm8["tensors"].keys() == mm["tensors"].keys()
    for f16, q in ((lm, lm8), (mm, mm8)):
        assert {name for name, t in q["tensors"].items() if t == "Q8_0"} == \
            {name for name, t in f16["tensors"].items() if t == "F16" and f16["row"][name] % 32 == 0}
    assert mm8["tensors"]["v.patch_embd.weight"] != "Q8_0" and "Q8_0" in mm8["tensors"].values()


def test_export_without_base_uses_the_recorded_one(run_dir: Path, gguf_base: Path, tmp_path: Path) -> None:
    recorded = json.loads((run_dir / "checkpoint-1" / export_model.BASE_FILE).read_text())
    assert recorded == {"base_model": str(gguf_base.resolve())}
    assert export_model.recorded_base(run_dir) == str(gguf_base.resolve())  # the final model too
    assert export_model.main([str(run_dir / "checkpoint-1"), "--out", str(tmp_path / "a")]) == 0
    assert export_model.main([str(run_dir / "checkpoint-1"), "--base", str(gguf_base),
                              "--out", str(tmp_path / "b")]) == 0
    for p in (tmp_path / "b").iterdir():
        assert (tmp_path / "a" / p.name).read_bytes() == p.read_bytes(), p.name


def test_lora_checkpoint_names_its_base(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    assert export_model.recorded_base(tmp_path) == "org/base"


def test_recorded_base_folder_missing_here_fails_clearly(tmp_path: Path, error_line) -> None:
    # A checkpoint copied from another machine: its base_model.json names a folder that is not here.
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / export_model.BASE_FILE).write_text(json.dumps({"base_model": "/home/alice/PaddleOCR-VL"}))
    line = error_line(export_model.main([str(ckpt), "--out", str(tmp_path / "x")]))
    assert "names the base /home/alice/PaddleOCR-VL, which is not a folder here" in line
    assert line.endswith("pass --base")
    # A LoRA adapter's base_model_name_or_path relative to the directory training ran in.
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./no-such-base"}))
    with pytest.raises(export_model.ExportError, match="not a folder here"):
        export_model.recorded_base(lora)


def test_folder_without_base_fails_clearly(release_model, tmp_path: Path, error_line) -> None:
    rc = export_model.main([str(release_model("v1")), "--out", str(tmp_path / "x")])
    line = error_line(rc)
    assert "does not say which base it was trained from" in line and line.endswith("pass --base")


def test_converter_without_paddleocr_fails_clearly(run_dir: Path, tmp_path: Path, monkeypatch,
                                                   error_line) -> None:
    old = tmp_path / "llama.cpp"
    (old / "conversion").mkdir(parents=True)
    (old / "convert_hf_to_gguf.py").write_text("# a converter from before PaddleOCR-VL\n")
    (old / "conversion" / "__init__.py").write_text('TEXT_MODEL_MAP = {"LlamaForCausalLM": "llama"}\n')
    monkeypatch.setenv("LLAMA_CPP_DIR", str(old))
    out = tmp_path / "out"
    rc = export_model.main([str(run_dir / "checkpoint-1"), "--out", str(out), "--gguf"])
    assert "does not know PaddleOCR-VL" in error_line(rc)
    assert not out.exists()  # checked before exporting anything


def test_unwritable_cache_fails_clearly(tmp_path: Path, monkeypatch, capsys) -> None:
    # No write access to ~/.cache (here: a cache "folder" under a file): one error line naming the way out,
    # from `make setup` (-m paddleocr_vl_manga.export.gguf --fetch) and from export_model.py --gguf alike,
    # before any download.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setattr(ocr_gguf.subprocess, "run", None)  # no pip
    assert ocr_gguf.main(["--fetch"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: could not write llama.cpp's converter into")
    assert "XDG_CACHE_HOME" in err


def test_demo_does_not_fetch_the_converter(tmp_path: Path) -> None:
    # `make demo` makes no GGUF: the converter's download (75 MB sdist, ~2 min on the 2-core dev VM) must not
    # count against its time; `make setup` and `make test` (the GGUF tests) still fetch it.
    root = Path(__file__).resolve().parents[2]

    def plan(target: str) -> str:
        return subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout

    assert "-m paddleocr_vl_manga.export.gguf --fetch" not in plan("demo") and "tools/demo.sh" in plan("demo")
    fetch = "-m paddleocr_vl_manga.export.gguf --fetch"
    assert fetch in plan("test") and fetch in plan("setup")


def fake_converter(folder: Path) -> Path:
    """A llama.cpp folder that passes check_converter; run_converter must be patched to use it."""
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(f'# "{ocr_gguf.ARCHITECTURE}"\n')
    return folder


def test_base_without_tokenizer_model_fails_clearly(release_model, tmp_path: Path) -> None:
    fake = fake_converter(tmp_path / "llama.cpp")
    with pytest.raises(ocr_gguf.GGUFError, match="no tokenizer.model") as failed:
        ocr_gguf.export_gguf(release_model("v1"), tmp_path / "out", llama_cpp=fake)
    # The way on for the stand-in path too, not a guess about how the base was saved.
    assert "tools/make_tiny_model.py --release_like" in str(failed.value)
    assert "saved by transformers?" not in str(failed.value)


@pytest.fixture
def base_copy_checkpoint(gguf_base: Path, tmp_path: Path) -> list[str]:
    """export_model.py's arguments for a checkpoint that is a copy of gguf_base (a cheap valid export)."""
    import shutil

    shutil.copytree(gguf_base, tmp_path / "checkpoint-1")
    return [str(tmp_path / "checkpoint-1"), "--base", str(gguf_base)]


def test_failed_gguf_leaves_no_folder_and_the_rerun_works(base_copy_checkpoint: list[str], tmp_path: Path,
                                                          monkeypatch, error_line, capsys) -> None:
    """Every command that writes a folder writes it whole or not at all: a failed conversion once left the
    plain export in --out, and the same command then stopped with "--out exists and is not empty"."""
    monkeypatch.setenv("LLAMA_CPP_DIR", str(fake_converter(tmp_path / "llama.cpp")))
    converted: list[str] = []

    def fail(llama_cpp: Path, args: list[str]) -> None:
        raise ocr_gguf.GGUFError("llama.cpp's converter failed (test): boom")

    def convert(llama_cpp: Path, args: list[str]) -> None:  # writes what the converter would
        Path(args[args.index("--outfile") + 1]).write_bytes(b"GGUF")
        converted.append(Path(args[0]).name)

    out = tmp_path / "exports" / "ft"
    monkeypatch.setattr(ocr_gguf, "run_converter", fail)
    assert "boom" in error_line(export_model.main([*base_copy_checkpoint, "--out", str(out), "--gguf"]))
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []  # no staging folder either
    monkeypatch.setattr(ocr_gguf, "run_converter", convert)
    assert export_model.main([*base_copy_checkpoint, "--out", str(out), "--gguf"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out), str(out / "model-f16.gguf"), str(out / "mmproj-f16.gguf")]
    assert (out / "config.json").is_file() and (out / "model-f16.gguf").read_bytes() == b"GGUF"
    assert converted == ["ft", "ft"]  # general.name comes from the final folder's name, not the staging's
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["ft"]


def test_full_disk_during_export_is_one_line_and_leaves_no_folder(base_copy_checkpoint: list[str],
                                                                   gguf_base: Path, tmp_path: Path) -> None:
    """`ulimit -f` below the weights' size (SIGXFSZ ignored, so the write fails with EFBIG as on a full disk):
    one line naming the file, no --out, no staging; the rerun exports."""
    import resource
    import signal

    weights = (gguf_base / "model.safetensors").stat().st_size
    others = max(p.stat().st_size for p in gguf_base.iterdir() if p.name != "model.safetensors")
    assert others < weights
    limit = (others + weights) // 2

    def limit_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "exports" / "ft"
    command = Path(__file__).resolve().parents[2] / "export_model.py"
    cmd = [sys.executable, str(command), *base_copy_checkpoint, "--out", str(out)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=limit_size, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"could not write {out / 'model.safetensors'}: the disk is full or a file-size limit" in line
    assert not (tmp_path / "exports").exists() or list((tmp_path / "exports").iterdir()) == []
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "model.safetensors").stat().st_size == weights


def test_unknown_gguf_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ocr_gguf.GGUFError, match="choose one of f16, q8_0"):
        ocr_gguf.export_gguf(tmp_path, tmp_path, "q4_0")


def test_stand_in_from_the_command_line_reaches_gguf(llama_cpp: Path, tmp_path: Path, capsys) -> None:
    """README's stand-in path: a release-like tiny model made on the command line exports to GGUF (it once
    had no tokenizer.model, and with 2 vision layers the converter cannot map the projector)."""
    import shutil

    from tools.make_tiny_model import main as make_tiny_model

    assert make_tiny_model(["--out", str(tmp_path / "base"), "--release_like", "v1"]) == 0
    shutil.copytree(tmp_path / "base", tmp_path / "checkpoint-1")
    out = tmp_path / "ft"
    assert export_model.main([str(tmp_path / "checkpoint-1"), "--base", str(tmp_path / "base"), "--out",
                              str(out), "--gguf"]) == 0
    assert (out / "model-f16.gguf").stat().st_size > 0 and (out / "mmproj-f16.gguf").stat().st_size > 0

    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 2
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ocr_gguf.GGUFError, match="vision encoder has 2 layers.*at least 3"):
        ocr_gguf.export_gguf(out, tmp_path / "two_layers", llama_cpp=llama_cpp)


def test_in_place_export_with_failed_gguf_leaves_the_checkpoint_as_it_was(
        base_copy_checkpoint: list[str], tmp_path: Path, monkeypatch, error_line) -> None:
    ckpt = Path(base_copy_checkpoint[0])
    (ckpt / "trainer_state.json").write_text("{}")  # what a checkpoint has and the base does not
    config = json.loads((ckpt / "config.json").read_text()) | {"written_by": "save_pretrained"}
    (ckpt / "config.json").write_text(json.dumps(config))  # what an export in place replaces by the base's
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    monkeypatch.setenv("LLAMA_CPP_DIR", str(fake_converter(tmp_path / "llama.cpp")))

    def fail(llama_cpp: Path, args: list[str]) -> None:
        raise ocr_gguf.GGUFError("llama.cpp's converter failed (test): boom")

    monkeypatch.setattr(ocr_gguf, "run_converter", fail)
    assert "boom" in error_line(export_model.main([*base_copy_checkpoint, "--out", str(ckpt), "--gguf"]))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "llama.cpp"]  # no staging
    assert export_model.main([*base_copy_checkpoint, "--out", str(ckpt)]) == 0  # in place, no GGUF
    assert (ckpt / "trainer_state.json").is_file() and "written_by" not in (ckpt / "config.json").read_text()


def test_converter_out_of_room_is_named_as_such(tmp_path: Path) -> None:
    # The converter is a subprocess: its "[Errno 28] No space left on device" must not read as a bug of ours.
    fake = fake_converter(tmp_path / "llama.cpp")
    (fake / "convert_hf_to_gguf.py").write_text('import errno, os\n# "PaddleOCRVLForConditionalGeneration"\n'
                                                'raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n')
    with pytest.raises(ocr_gguf.GGUFError) as failed:
        ocr_gguf.run_converter(fake, [str(tmp_path), "--outfile", str(tmp_path / "model-f16.gguf")])
    message = "llama.cpp's converter could not write model-f16.gguf: the disk is full"
    assert str(failed.value).startswith(message)


def test_existing_empty_out_is_kept_and_filled(base_copy_checkpoint: list[str], tmp_path: Path) -> None:
    """An existing empty --out (a Docker volume, a USB drive: a mount point) can be neither removed nor
    renamed onto ("error: ...: Device or resource busy"), and its parent is another file system: the folder
    itself must stay (same inode) and be filled from a staging folder inside it."""
    out = tmp_path / "volume"
    out.mkdir()
    inode = out.stat().st_ino
    assert export_model.main([*base_copy_checkpoint, "--out", str(out)]) == 0
    assert out.stat().st_ino == inode and (out / "model.safetensors").is_file()
    assert not (out / export_model.STAGING).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "volume"]  # nothing beside it


def test_rerun_after_kill_into_an_existing_out_works(base_copy_checkpoint: list[str], tmp_path: Path) -> None:
    # What `kill -9` leaves in an existing --out: its staging folder, which must not block the same command.
    out = tmp_path / "volume"
    (out / export_model.STAGING).mkdir(parents=True)
    (out / export_model.STAGING / "model.safetensors").write_bytes(b"half")
    assert export_model.main([*base_copy_checkpoint, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "model.safetensors").stat().st_size > 4


def test_converter_short_tensor_write_is_named_as_such(tmp_path: Path) -> None:
    """The converter writes tensors with numpy's tofile(), which on a full disk says only "N requested and
    M written" (no errno), and tqdm then prints its bar: the error once showed the bar ("Writing: 0%")."""
    fake = fake_converter(tmp_path / "llama.cpp")
    (fake / "convert_hf_to_gguf.py").write_text(
        f'# "{ocr_gguf.ARCHITECTURE}"\n'
        "import resource, signal, sys\nimport numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a disk that fills after 4 kB\n"
        "try:\n"
        "    with open(sys.argv[sys.argv.index('--outfile') + 1], 'wb') as f:\n"
        "        np.zeros(1 << 16, np.float32).tofile(f)\n"
        "finally:\n"
        "    print('Writing:   0%|          | 0.00/13.3M [00:00<?, ?byte/s]')\n"
    )
    with pytest.raises(ocr_gguf.GGUFError) as failed:
        ocr_gguf.run_converter(fake, [str(tmp_path), "--outfile", str(tmp_path / "mmproj-f16.gguf")])
    message = "llama.cpp's converter could not write mmproj-f16.gguf: the disk is full"
    assert str(failed.value).startswith(message)


def test_converter_failure_shows_the_error_not_the_progress_bar(tmp_path: Path) -> None:
    fake = fake_converter(tmp_path / "llama.cpp")
    (fake / "convert_hf_to_gguf.py").write_text(
        f'# "{ocr_gguf.ARCHITECTURE}"\n'
        "try:\n    raise ValueError('Can not map tensor x')\n"
        "finally:\n    print('Writing:   0%|          | 0.00/13.3M [00:00<?, ?byte/s]')\n"
    )
    with pytest.raises(ocr_gguf.GGUFError) as failed:
        ocr_gguf.run_converter(fake, [str(tmp_path), "--outfile", str(tmp_path / "model-f16.gguf")])
    assert str(failed.value).endswith(": ValueError: Can not map tensor x")
