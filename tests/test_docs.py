"""README.md and docs/: generated tables are current, links resolve, commands name real scripts and flags."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

from tools import write_docs as wd

ROOT = Path(__file__).resolve().parents[1]
# Links to what is made later, or by another branch: the pictures (`make docs-images` after `make demo`) and
# the GGUF pages. Reported by test_pending_link_targets (skipped while any is missing), not as failures.
PENDING = {"docs/images/training_curves.png", "docs/images/report.png", "docs/export_gguf.md",
           "docs/gguf_cpu.md"}


def _pending(problem: str) -> bool:
    return any(Path(p).name in problem for p in PENDING) and "no file" in problem


def test_generated_tables_are_current() -> None:
    # A fresh process: the tables are rendered with os.cpu_count() patched (see CPU_COUNT_SENTINEL).
    run = subprocess.run([sys.executable, "tools/write_docs.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_stale_table_is_rewritten() -> None:
    stale = "intro\n<!-- flags:export_model.py -->\n| flag | default | meaning |\n| `--old` | 1 | gone |\n" \
            "<!-- /flags -->\nafter `<!-- flags:predict.py -->` in prose is left alone\n"
    new = wd.render(stale)
    assert "`--old`" not in new and "| `--out` | (required) | new or empty folder for the export" in new
    assert new.startswith("intro\n") and new.endswith("in prose is left alone\n") and wd.render(new) == new


def test_flag_without_help_and_train_sh_variable_without_comment_fail(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "docs_fixture_cli.py").write_text(textwrap.dedent("""
        import argparse
        def main(argv=None):
            ap = argparse.ArgumentParser()
            ap.add_argument("--documented", type=int, default=3, help="has a help text")
            ap.add_argument("--bare", choices=["a", "b"])
            ap.parse_args(argv)
            raise SystemExit("main ran past parse_args")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="docs_fixture_cli.py: no help text for `--bare`"):
        wd.flag_rows("docs_fixture_cli.py")

    script = tmp_path / "train.sh"
    script.write_text("# what A is\nA=${A:-1}\nB=${B:-x}   # what B is\n# default: 2e-5 or 2e-4\nC=${C:-$D}"
                      "   # what C is\n")
    assert wd.train_sh_rows(script) == [("`A`", "`1`", "what A is"), ("`B`", "`x`", "what B is"),
                                        ("`C`", "2e-5 or 2e-4", "what C is")]
    script.write_text("A=${A:-1}   # what A is\n\nE=${E:-0}\n")
    with pytest.raises(ValueError, match="train.sh: E has no comment"):
        wd.train_sh_rows(script)


def test_help_shows_the_table_texts() -> None:
    """The tables and `--help` print one help string: each row's meaning is in the script's --help."""
    squash = "".join  # argparse wraps lines, at hyphens too
    for script in ("predict.py", "export_model.py", "evaluate_model.py", "tools/make_tiny_model.py"):
        help_text = squash(wd.capture_parser(script).format_help().split())
        for _, _, meaning in wd.flag_rows(script):
            first = meaning.split(" One of ")[0].replace("\\|", "|")
            assert squash(first.split())[:50] in help_text, (script, first)


def test_links_resolve() -> None:
    problems = [p for p in wd.check_links(wd.doc_files()) if not _pending(p)]
    assert not problems, "\n".join(problems)


def test_pending_link_targets() -> None:
    missing = sorted(p for p in PENDING if not (ROOT / p).exists())
    if missing:
        pytest.skip(f"not made yet: {', '.join(missing)} (make docs-images after make demo; the GGUF pages "
                    "come from their own branch)")


def test_link_checker_catches_bad_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## `train.sh` settings\n\n## Speed\n\n## Speed\n")
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        # Page: one, two

        [ok](other.md#trainsh-settings) [ok](other.md#speed-1) [ok](#page-one-two) [web](https://x.org/a#b)
        [bad file](missing.md) [bad anchor](other.md#speed-2) ![bad image](img/none.png) [bad](#nothing)
        `[in code](nowhere.md)`

        ```bash
        # a comment, not a heading: [in a fence](nowhere.md)
        ```
    """))
    problems = wd.check_links([page], root=tmp_path)
    assert len(problems) == 4, problems
    for target in ("missing.md", "other.md#speed-2", "img/none.png", "#nothing"):
        assert any(f"({target})" in p for p in problems), (target, problems)


def test_commands_name_real_scripts_and_flags() -> None:
    problems = wd.check_commands(wd.doc_files())
    assert not problems, "\n".join(problems)


def test_command_checker_catches_bad_scripts_flags_and_variables(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        ```bash
        python predict.py --model_path ./m --no_such_flag a.png          # bad flag
        python tools/make_tiny_model.py --out ./t --seed 1 && make demo   # fine
        LR=1e-5 OMP_NUM_THREADS=1 bash train.sh --max_steps 5 --lora_r 4 # fine: TrainingArguments + ours
        NOT_A_SETTING=1 bash train.sh --no_such_option                   # two problems
        python no_such_script.py --x 1; make no-such-target
        python export_model.py ./c --base b \\
            --outt ./o
        pip install -r requirements.txt                                   # not a repo script: skipped
        ```

        Run `python evaluate_model.py --split val --made_up 3` or `make test`.
    """))
    problems = wd.check_commands([page], root=ROOT)
    expected = ["predict.py: no flag --no_such_flag", "train.sh: does not read NOT_A_SETTING",
                "train.sh: no flag --no_such_option", "no_such_script.py: no such script",
                "make no-such-target: no such target", "export_model.py: no flag --outt",
                "evaluate_model.py: no flag --made_up"]
    assert len(problems) == len(expected), problems
    for e in expected:
        assert any(e in p for p in problems), (e, problems)


def fake_demo_output(root: Path) -> Path:
    demo = root / "demo_output"
    (demo / "sft_output").mkdir(parents=True)
    (demo / "eval_after").mkdir()
    curves = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(curves).line([(10, 190), (310, 10)], fill="blue", width=3)
    curves.save(demo / "sft_output" / "training_curves.png")
    rows = "".join(f"<tr><td>book {i}</td><td>{i * 7 % 50} %</td></tr>" for i in range(40))
    (demo / "eval_after" / "report.html").write_text(
        f"<html><body style='font: 24px sans-serif'><h1>report</h1><table border=1>{rows}</table></body>"
        "</html>")
    return demo


def test_images_need_a_demo_output(tmp_path: Path) -> None:
    assert wd.main(["--images", str(tmp_path / "nothing"), "--images_dir", str(tmp_path / "img")]) == 2
    assert not (tmp_path / "img").exists()


@pytest.mark.skipif(wd.chromium_binary() is None,
                    reason="no Chromium on this machine (.ci/run installs Debian's chromium when it can)")
def test_images_from_a_demo_output(tmp_path: Path) -> None:
    demo, out = fake_demo_output(tmp_path), tmp_path / "images"
    made = wd.make_images(demo, out, synth_preview=False)
    assert [p.name for p in made] == ["training_curves.png", "report.png"]
    curves = demo / "sft_output" / "training_curves.png"
    assert (out / "training_curves.png").read_bytes() == curves.read_bytes()
    with Image.open(out / "report.png") as shot:
        assert shot.size == wd.REPORT_WINDOW
        assert ImageStat.Stat(shot.convert("L")).stddev[0] > 20  # the page, not a blank or error screen


def _demo_defaults() -> dict[str, str]:
    """tools/demo.sh's settings: NAME=${DEMO_X:-default} lines, $VARS in them expanded."""
    found = dict(re.findall(r"^([A-Z_]+)=\$\{DEMO_[A-Z_]+:-(.*)\}$", (ROOT / "tools/demo.sh").read_text(),
                            flags=re.M))
    return {k: re.sub(r"\$([A-Z_]+)", lambda m: found[m[1]], v) for k, v in found.items()}


def _flags(words: list[str]) -> dict[str, str]:
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def _readme_command(script: str) -> list[str]:
    commands = [w for code in wd.commands_in(ROOT / "README.md") for w in wd.simple_commands(code)]
    found = [w for w in commands if script in w]
    assert found, f"README runs no {script}"
    return found[0]


def test_readme_stand_in_is_the_model_the_demo_trains() -> None:
    # A new user without weights must find the tiny model command, with the flags that make it learn.
    demo = _demo_defaults()
    wanted = _flags(demo["TINY_ARGS"].split() + ["--end"])
    assert _flags(_readme_command("tools/make_tiny_model.py")).items() >= wanted.items()


def test_readme_synthetic_release_has_the_charset_the_demo_trains() -> None:
    # With the default full charset, a short run left 125 of 209 answers empty and looked like progress.
    demo, readme = _demo_defaults(), _flags(_readme_command("tools/make_synthetic_manga109.py"))
    assert (readme.get("--charset"), readme.get("--max_chars")) == (demo["CHARSET"], demo["MAX_CHARS"])


def test_documented_output_folders_are_ignored_by_git() -> None:
    outputs = set()
    for page in wd.doc_files():
        for code in wd.commands_in(page):
            for words in wd.simple_commands(code):
                flags = _flags(words)
                outputs |= {flags[f] for f in ("--out", "--output_dir") if f in flags}
                outputs |= {w.split("=", 1)[1] for w in words if w.startswith("OUTPUT_DIR=")}
    relative = sorted(p for p in outputs if p and not p.startswith(("/", "$", "-")) and "$" not in p)
    assert "./ft-2000" in relative
    inside = [f"{p.rstrip('/')}/model.safetensors" for p in relative]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *inside], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(set(inside) - set(ignored)) == []


def test_readme_says_where_owocr_runs() -> None:
    # The kit's .venv has owocr as a no-deps test install: the command runs in the user's own environment.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    before_command = text[:text.index("owocr -e mangaocr")].rsplit("\n\n", 2)[-2:]
    assert "your own environment" in " ".join(before_command).replace("\n", " ")


def test_repository_map_lists_every_module_and_needs_a_docstring(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    block = text.split(wd.MAP_START)[1].split(wd.MAP_END)[0]
    folders = (ROOT, ROOT / "tools", ROOT / "benchmarks")
    modules = [p.relative_to(ROOT) for d in folders for p in d.glob("*.py") if p.name != "__init__.py"]
    modules += [p.relative_to(ROOT) for p in (ROOT / wd.MAP_PACKAGE).rglob("*.py") if p.name != "__init__.py"]
    assert modules and all(f"\n{m} " in block for m in modules), block
    (tmp_path / "tools").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "documented.py").write_text('"""Does one thing. More detail here."""\n')
    assert "documented.py  Does one thing.\n" in wd.repo_map(tmp_path)
    (tmp_path / "new_module.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="new_module.py: no docstring"):
        wd.repo_map(tmp_path)


# The root modules that moved into paddleocr_vl_manga/ (issue 28), each with its new home.
MOVED = {
    "custom_collator": "paddleocr_vl_manga.data.collator",
    "ocr_dataset": "paddleocr_vl_manga.data.dataset",
    "sample_lengths": "paddleocr_vl_manga.data.lengths",
    "prepare_manga109_data": "paddleocr_vl_manga.data.manga109",
    "synthesize_lines": "paddleocr_vl_manga.data.synth.run",
    "ocr_model": "paddleocr_vl_manga.model.loading",
    "ocr_lora": "paddleocr_vl_manga.model.lora",
    "ocr_quantize": "paddleocr_vl_manga.model.quantize",
    "ocr_metrics": "paddleocr_vl_manga.evaluate.metrics",
    "ocr_report": "paddleocr_vl_manga.evaluate.report",
    "evaluate_model": "paddleocr_vl_manga.evaluate.evaluation",
    "export_model": "paddleocr_vl_manga.export.layout",
    "ocr_gguf": "paddleocr_vl_manga.export.gguf",
    "sft_paddleocr_vl": "paddleocr_vl_manga.train.run",
    "rehearsal": "paddleocr_vl_manga.train.rehearsal",
    "memory_plan": "paddleocr_vl_manga.train.memory_plan",
    "gpu_launch": "paddleocr_vl_manga.train.launch",
    "train_settings": "paddleocr_vl_manga.train.settings",
    "predict": "paddleocr_vl_manga.infer.predict",
    "manga_ocr_compat": "paddleocr_vl_manga.infer.manga_ocr",
}


def _root_names(name: str) -> set[str] | None:
    """What `from <name> import X` still gives at the root (its __all__, or `main`), None if no such file."""
    path = ROOT / f"{name}.py"
    if not path.exists():
        return None
    found = re.search(r"__all__ = \[([^\]]*)\]", path.read_text(encoding="utf-8"))
    return set(re.findall(r'"(\w+)"', found.group(1))) if found else {"main"}


def test_docs_and_commands_name_no_module_that_moved() -> None:
    # `ocr_model.load_model_and_processor`, or `(ocr_lora.py)` in a --help, names a file that is gone.
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("*.py"), *ROOT.glob("*.sh"),
             *ROOT.glob("compat/**/*.py"), *ROOT.glob("paddleocr_vl_manga/**/*.py"), *ROOT.glob("tools/*.py"),
             *ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.md")]
    mention = re.compile(rf"(?<![\w/.\-])({'|'.join(MOVED)})\.(\w+)")
    stale = []
    for path in texts:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name, attr in mention.findall(line):
                names = _root_names(name)
                ok = attr in ("json", "jsonl") or (names is not None and (attr == "py" or attr in names))
                if not ok:
                    stale.append(f"{path.relative_to(ROOT)}:{n}: {name}.{attr}")
    assert not stale, "names of modules that moved (write the package's module):\n" + "\n".join(stale)


def test_every_moved_module_is_named_with_its_new_home() -> None:
    # Code and notebooks that did `import ocr_model` get ModuleNotFoundError: the docs say where it went.
    text = (ROOT / "docs/development.md").read_text(encoding="utf-8")
    missing = [old for old, new in MOVED.items()
               if not re.search(rf"`{old}`[^\n]*`{re.escape(new)}`", text)]
    assert not missing, f"docs/development.md does not say where these went: {missing}"
    for new in MOVED.values():
        assert (ROOT / (new.replace(".", "/") + ".py")).exists(), new


def test_every_manga_ocr_argument_has_a_row_in_its_table() -> None:
    # a reader's tool constructs MangaOcr(...): an argument missing from the table is one nobody finds
    # (full_vocabulary is the way off for the restricted lm_head a fine-tune loads with by default)
    import inspect

    from paddleocr_vl_manga.infer.manga_ocr import MangaOcr

    text = (ROOT / "docs" / "inference.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, flags=re.M))
    rows = {name for pair in rows for name in pair if name}
    missing = [n for n in inspect.signature(MangaOcr.__init__).parameters if n != "self" and n not in rows]
    assert not missing, f"docs/inference.md's MangaOcr table lacks {missing}"
