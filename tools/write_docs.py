"""Write every generated part of the docs, and check the docs against the code.

    python tools/write_docs.py                       # rewrite the tables in README.md and docs/*.md
    python tools/write_docs.py --check               # exit 1 when a table is stale (tests/test_docs.py)
    python tools/write_docs.py --images demo_output  # the docs' pictures from `make demo`'s output folder

Tables (the text between `<!-- flags:SCRIPT -->` and `<!-- /flags -->`, or `<!-- memory-plan -->` and
`<!-- /memory-plan -->`) come from the code, so they cannot drift from it:

- a script's flags from its own parser, the one its `--help` prints (captured by running its `main()` up to
  `parse_args`): each flag, its default and its `help` text. For `sft_paddleocr_vl.py` only its own
  dataclasses (every Hugging Face `TrainingArguments` flag is accepted too, documented by transformers);
- `train.sh`'s variables from its own lines: `NAME=${NAME:-default}` and the comment beside or above it
  (a comment line `default: ...` overrides the shown default where it is an expression);
- the memory plan from `train.memory_plan.readme_table()`;
- docs/development.md's repository map (between `<!-- repo-map -->` and `<!-- /repo-map -->`) from each
  module's docstring, its first sentence.

The link and command checks (`check_links`, `check_commands`) are run by tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/write_docs.py`: the scripts are imported from the root
    sys.path.insert(0, str(ROOT))
DOC_FILES = ("README.md", "docs/*.md")
FLAGS_START = re.compile(r"^<!-- flags:(\S+) -->$", flags=re.M)  # on a line of its own
FLAGS_END = "<!-- /flags -->"
# A default of os.cpu_count() would make the tables differ from machine to machine: the table generation
# runs with cpu_count() patched to this number and prints it as "CPU count".
CPU_COUNT_SENTINEL = 987_654


def _rel(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def doc_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for pattern in DOC_FILES for p in root.glob(pattern))


# -- flag tables ----------------------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def script_module(script: str) -> str:
    """`tools/make_tiny_model.py` -> `tools.make_tiny_model` (tools/ and benchmarks/ are packages)."""
    return script.removesuffix(".py").replace("/", ".")


def has_parser(script: str, root: Path = ROOT) -> bool:
    path = root / script
    if path.suffix != ".py" or not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    leaf = re.search(r"^from ([\w.]+) import main$", text, re.M)  # a command: its parser is in the package
    if leaf:
        text = (root / Path(*leaf.group(1).split("."))).with_suffix(".py").read_text(encoding="utf-8")
    return "ArgumentParser" in text


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def capture_parser(script: str) -> argparse.ArgumentParser:
    """The parser `script`'s main() builds, taken at its parse_args call: nothing after it runs."""
    if script in _PARSERS:
        return _PARSERS[script]
    module = importlib.import_module(script_module(script))
    original = argparse.ArgumentParser.parse_known_args

    def grab(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = grab  # HfArgumentParser parses through it too
    try:
        takes_argv = bool(inspect.signature(module.main).parameters)
        module.main([]) if takes_argv else module.main()
    except _Captured as captured:
        _PARSERS[script] = captured.parser
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise RuntimeError(f"{script}: main() returned without parsing arguments")


def own_dests(parser: argparse.ArgumentParser) -> set[str] | None:
    """With HfArgumentParser: the fields of the script's own dataclasses (not transformers')."""
    types = getattr(parser, "dataclass_types", None)
    if not types:
        return None
    return {f.name for t in types if not t.__module__.startswith("transformers") for f in fields(t)}


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
        return "(required)"
    if isinstance(d, bool):
        return "on" if d else "off"
    if d is None or d == []:
        return "–"
    if d == CPU_COUNT_SENTINEL:
        return "CPU count"
    if isinstance(d, (int, float)):
        return str(d)
    if isinstance(d, (list, tuple)):
        return " ".join(f"`{x}`" for x in d)
    return f"`{d}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def flag_rows(script: str) -> list[tuple[str, str, str]]:
    """(flag, default, meaning) for each argument `script --help` lists (its own ones, for sft)."""
    parser = capture_parser(script)
    mine = own_dests(parser)
    # the base formatter: HfArgumentParser's would append "(default: ...)", which the table has a column for
    formatter = argparse.HelpFormatter(parser.prog)
    rows, missing = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if mine is not None and action.dest not in mine:
            continue
        # HfArgumentParser adds --no_X beside a boolean X that defaults to True: one row is enough
        if any(o.startswith("--no_") for o in action.option_strings) and isinstance(action,
                                                                                  argparse._StoreFalseAction):
            continue
        # HfArgumentParser also accepts --a-b for --a_b: the docs name one spelling
        opts = action.option_strings
        names = [o for o in opts if not ("-" in o[2:] and "--" + o[2:].replace("-", "_") in opts)]
        name = ", ".join(f"`{o}`" for o in names) or f"`{action.metavar or action.dest}`"
        if not action.help:
            missing.append(name)
            continue
        meaning = formatter._expand_help(action)
        if action.choices and not all(str(c) in meaning for c in action.choices):
            one_of = ", ".join(f"`{c}`" for c in action.choices)
            meaning += ("" if meaning.endswith(".") else ".") + f" One of {one_of}."
        rows.append((name, _default(action), _cell(meaning)))
    if missing:
        raise ValueError(f"{script}: no help text for {', '.join(missing)} (--help and the docs need one)")
    return rows


def table(rows: list[tuple[str, str, str]], head: tuple[str, str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} | {head[2]} |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


TRAIN_SH_VAR = re.compile(r"^([A-Z_][A-Z0-9_]*)=\$\{\1:-(.*?)\}(?:\s+#\s?(.*))?$")


def train_sh_rows(path: Path = ROOT / "train.sh") -> list[tuple[str, str, str]]:
    """train.sh's settings: each `NAME=${NAME:-default}` line with the comment beside it and above it."""
    rows, above = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            above.append(line[1:].strip())
            continue
        m = TRAIN_SH_VAR.match(line)
        if m:
            name, default, beside = m.groups()
            notes = [*above, *([beside] if beside else [])]
            shown = next((n[len("default:"):].strip() for n in notes if n.startswith("default:")), None)
            meaning = " ".join(n for n in notes if not n.startswith("default:"))
            if not meaning:
                raise ValueError(f"train.sh: {name} has no comment beside or above it (the docs need one)")
            rows.append((f"`{name}`", shown or (f"`{default}`" if default else "–"), _cell(meaning)))
        above = []
    return rows


def flags_block(script: str) -> str:
    if script == "train.sh":
        return table(train_sh_rows(), ("variable", "default", "meaning"))
    return table(flag_rows(script), ("flag", "default", "meaning"))


def render(text: str) -> str:
    """`text` with every generated block rewritten."""
    out, pos = [], 0
    for m in FLAGS_START.finditer(text):
        end = text.find(FLAGS_END, m.end())
        if end < 0:
            raise ValueError(f"{m.group(0)} has no {FLAGS_END}")
        out += [text[pos:m.end()], "\n", flags_block(m.group(1)), "\n"]
        pos = end
    text = "".join(out) + text[pos:]
    if MAP_START in text:
        start, stop = (re.escape(m) for m in (MAP_START, MAP_END))
        text = re.sub(f"^{start}$.*?^{stop}$", lambda _: f"{MAP_START}\n{repo_map()}\n{MAP_END}", text,
                      flags=re.S | re.M)
    from paddleocr_vl_manga.train.memory_plan import README_MARKERS, readme_table

    start, stop = (re.escape(s) for s in README_MARKERS)
    return re.sub(f"^{start}$.*?^{stop}$", lambda _: readme_table(), text, flags=re.S | re.M)


def write_tables(check: bool) -> int:
    stale = []
    for path in doc_files():
        old = path.read_text(encoding="utf-8")
        new = render(old)
        if new != old:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(new, encoding="utf-8")
    if check and stale:
        print(f"error: stale tables in {', '.join(map(str, stale))}: run python tools/write_docs.py",
              file=sys.stderr)
        return 1
    print("tables: " + (f"rewrote {', '.join(map(str, stale))}" if stale else "up to date"))
    return 0


# -- the repository map (docs/development.md) -----------------------------------------------------------

MAP_START, MAP_END = "<!-- repo-map -->", "<!-- /repo-map -->"
MAP_PACKAGE = "paddleocr_vl_manga"


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring (its first line when that has no full stop)."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    cut = first.find(". ")
    text = first[: cut + 1] if cut > 0 else first
    if not text:
        raise ValueError(f"{path.name}: no docstring (the repository map is written from them)")
    return text


def repo_map(root: Path = ROOT) -> str:
    """The map between the markers: the commands, the package by stage, tools/ and benchmarks/, each module
    with the first sentence of its docstring, so the map cannot leave a module out."""
    rows: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.py")):
        rows.append((path.name, _summary(path)))
    rows.append(("train.sh", "the training command: settings as environment variables (docs/training.md)"))
    pkg = root / MAP_PACKAGE
    def order(p: Path) -> tuple:
        return p.parent.relative_to(pkg).parts, p.name != "__init__.py", p.name

    for path in sorted(pkg.rglob("*.py"), key=order):
        rel = path.relative_to(root)
        name = f"{rel.parent}/" if path.name == "__init__.py" else str(rel)
        rows.append((name, _summary(path)))
    for folder in ("tools", "benchmarks"):
        for path in sorted((root / folder).glob("*.py")):
            if path.name != "__init__.py":
                rows.append((str(path.relative_to(root)), _summary(path)))
    width = max(len(name) for name, _ in rows) + 2
    lines = []
    for name, text in rows:
        wrapped = textwrap.wrap(text, 110 - width) or [""]
        lines += [f"{name:<{width}}{wrapped[0]}"] + [" " * width + more for more in wrapped[1:]]
    return "```\n" + "\n".join(lines) + "\n```"


# -- link and command checks ----------------------------------------------------------------------------

FENCE = re.compile(r"^(\s*)(```+|~~~+)(.*)$")


def split_fences(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The prose lines (code blocks blanked) and the fenced blocks as (language, body)."""
    prose, blocks, fence, lang, body = [], [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang, body = m.group(2), m.group(3).strip(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((lang, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in split_fences(path.read_text(encoding="utf-8"))[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
    out = set()
    for slug, n in seen.items():
        out |= {slug, *(f"{slug}-{i}" for i in range(1, n))}
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def check_links(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Relative links that don't resolve: a missing file, or an anchor with no such heading."""
    problems = []
    for path in paths:
        prose = "\n".join(split_fences(path.read_text(encoding="utf-8"))[0])
        prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans are not links
        for target in LINK.findall(prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not reachable offline
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{_rel(path, root)}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: no file {file}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {_rel(dest, root)}")
    return problems


# Variables a command may set for any program; train.sh and tools/demo.sh are checked for their own.
PROCESS_ENV = {"OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE",
               "TRANSFORMERS_OFFLINE", "MANGA_OCR_COMPAT_MODEL", "MANGA_OCR_FONTS", "PYTORCH_CUDA_ALLOC_CONF",
               "PYTORCH_ALLOC_CONF", "PYTHON"}
PYTHONS = {"python", "python3", "$PYTHON", ".venv/bin/python", "$(BIN)/python"}
SEPARATORS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}
KEYWORDS = {"do", "then", "else", "elif", "sudo", "time", "exec", "!", "{", "}"}


def shell_vars(path: Path) -> set[str]:
    """Every variable name a shell script reads (${NAME...} or $NAME)."""
    return set(re.findall(r"\$\{?!?([A-Za-z_][A-Za-z0-9_]*)", path.read_text(encoding="utf-8")))


def make_targets(root: Path = ROOT) -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (root / "Makefile").read_text(encoding="utf-8"), flags=re.M))


def simple_commands(code: str) -> list[list[str]]:
    """Shell text -> the words of each simple command (continuations joined, comments and operators cut)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line.replace("[", " ").replace("]", " "), posix=True, punctuation_chars=";&|()")
        lex.whitespace_split, lex.commenters = True, "#"
        try:
            words = list(lex)
        except ValueError:  # an unclosed quote: not a command we can read
            continue
        current: list[str] = []
        for w in words:
            if w in SEPARATORS:
                out.append(current)
                current = []
            else:
                current.append(w)
        out.append(current)
    return [c for c in out if c]


def check_command(words: list[str], root: Path = ROOT) -> list[str]:
    """What is wrong with one command that runs a repo script (nothing when it runs no repo script)."""
    while words and words[0] in KEYWORDS:
        words = words[1:]
    env = []
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        env.append(words[0].split("=", 1)[0])
        words = words[1:]
    if not words:
        return []
    prog, args = words[0], words[1:]
    if prog == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        return [f"make {t}: no such target in Makefile" for t in targets if t not in make_targets(root)]
    if prog in ("bash", "sh") and args and args[0].endswith(".sh"):
        script, args = args[0], args[1:]
    elif prog in PYTHONS and args and args[0].endswith(".py"):
        script, args = args[0], args[1:]
    elif prog.endswith((".sh", ".py")) and "/" not in prog.lstrip("./"):
        script = prog.removeprefix("./")
    else:
        return []
    if script.startswith("/"):  # /path/to/this/repo/...: an example path, not ours
        return []
    script = os.path.normpath(script)
    if not (root / script).is_file():
        return [f"{script}: no such script"]
    problems = []
    if script == "train.sh":
        allowed_env = shell_vars(root / "train.sh") | PROCESS_ENV
        parser: argparse.ArgumentParser | None = capture_parser("sft_paddleocr_vl.py")  # it passes them on
    elif script.endswith(".sh"):
        allowed_env = shell_vars(root / script) | PROCESS_ENV
        parser = None
    else:
        allowed_env = PROCESS_ENV
        parser = capture_parser(script) if has_parser(script, root) else None
    problems += [f"{script}: does not read {v}" for v in env if v not in allowed_env]
    if parser is not None:
        known = set(parser._option_string_actions)
        for a in args:
            flag = a.split("=", 1)[0]
            if re.match(r"^--?[A-Za-z]", flag) and flag not in known:
                problems.append(f"{script}: no flag {flag}")
    return problems


def commands_in(path: Path) -> list[str]:
    """The shell commands of a page: fenced bash/sh/console blocks, and code spans that run a repo script."""
    prose, blocks = split_fences(path.read_text(encoding="utf-8"))
    out = [body for lang, body in blocks if lang in ("bash", "sh", "shell", "console")]
    for span in re.findall(r"`([^`\n]+)`", "\n".join(prose)):
        if re.match(r"^(?:[A-Z_]+=\S*\s+)*(?:python3?|bash|make)\s", span):
            out.append(span)
    return out


def check_commands(paths: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for path in paths:
        for code in commands_in(path):
            for words in simple_commands(code):
                problems += [f"{_rel(path, root)}: {p}  [{' '.join(words)}]"
                             for p in check_command(words, root)]
    return problems


# -- pictures -------------------------------------------------------------------------------------------

IMAGES = {  # docs picture -> how it is made
    "training_curves.png": "copied from DEMO_DIR/sft_output/training_curves.png",
    "report.png": "DEMO_DIR/eval_after/report.html rendered in headless Chromium",
    "synth_preview.png": "synthesize_lines.py --num_lines 250 --seed 1 --preview (offline text)",
}
REPORT_WINDOW = (1200, 1500)


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with the flags a root, offline, display-less machine needs (no sandbox, no GPU)."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no Chromium on this machine (Debian: apt-get install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={cwd / 'chromium-profile'}"]
    return subprocess.run([binary, *flags, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=True)


def make_images(demo_dir: Path, out_dir: Path, synth_preview: bool = True) -> list[Path]:
    """The docs' pictures from a `make demo` output folder (and the synthetic-lines preview)."""
    curves = demo_dir / "sft_output" / "training_curves.png"
    report = demo_dir / "eval_after" / "report.html"
    for need in (curves, report):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found: is {demo_dir} the output folder of `make demo`?")
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [out_dir / "training_curves.png", out_dir / "report.png"]
    shutil.copyfile(curves, made[0])
    with tempfile.TemporaryDirectory() as tmp:
        chromium(f"--screenshot={made[1]}", "--window-size={},{}".format(*REPORT_WINDOW),
                 report.resolve().as_uri(), cwd=Path(tmp))
        if synth_preview:
            lines = Path(tmp) / "lines"
            subprocess.run([sys.executable, str(ROOT / "synthesize_lines.py"), "--out", str(lines),
                            "--num_lines", "250", "--seed", "1", "--preview", "true"], check=True)
            made.append(out_dir / "synth_preview.png")
            shutil.copyfile(lines / "preview.png", made[-1])
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is stale")
    ap.add_argument("--images", metavar="DEMO_DIR",
                    help="make the docs' pictures from this `make demo` output folder instead of the tables")
    ap.add_argument("--images_dir", default=str(ROOT / "docs" / "images"), help="where the pictures go")
    ap.add_argument("--no_synth_preview", action="store_true",
                    help="with --images: leave the synthetic-lines preview as it is")
    a = ap.parse_args(argv)
    try:
        if a.images:
            for p in make_images(Path(a.images), Path(a.images_dir), synth_preview=not a.no_synth_preview):
                print(f"wrote {p}")
            return 0
        os.cpu_count = lambda: CPU_COUNT_SENTINEL  # before any script is imported: see CPU_COUNT_SENTINEL
        return write_tables(a.check)
    except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
