"""The kit's shape, read from its own imports (ast, imports inside functions included), in the spirit of
torchtune's recipe guard: the commands at the root are leaves, the package's stages import down the pipeline
data -> model -> evaluate/export -> train/infer, there are no cycles and no `sys.path` edits in the package.

Issue 28 moves the kit into one package in steps; until a step lands, the test it makes pass is marked as an
expected failure (strict: a mark left behind after its step fails the suite)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "paddleocr_vl_manga"
# Rank of each stage: a module may import its own stage and any stage of a lower rank, never a peer's.
STAGE_RANK = {"data": 0, "model": 1, "evaluate": 2, "export": 2, "train": 3, "infer": 3, "serve": 4}
# The commands users type (README, docs/): leaves that nothing imports.
COMMANDS = ["prepare_manga109_data", "synthesize_lines", "sft_paddleocr_vl", "evaluate_model", "predict",
            "export_model", "serve", "ocr_dataset", "custom_collator"]  # the last two: the seed's re-exports
OUTSIDE = {"tools", "benchmarks", "tests"}


def kit_modules() -> dict[str, Path]:
    """Module name -> file for every Python file of the kit outside tests/ (root, package, tools,
    benchmarks, compat)."""
    files = [p for p in ROOT.glob("*.py")]
    files += [p for d in ("tools", "benchmarks", PACKAGE) for p in (ROOT / d).rglob("*.py")]
    files += list((ROOT / "compat").rglob("*.py"))
    mods = {}
    for path in files:
        rel = path.relative_to(ROOT / "compat" if path.is_relative_to(ROOT / "compat") else ROOT)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names imported anywhere in the file (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = kit_modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported in imports_of(name, path):
            # `from pkg.mod import name` also lists pkg.mod.name: keep the longest prefix that is a module
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in mods:
                    deps.add(".".join(parts[:i]))
                    break
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_kit_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_nothing_imports_a_command():
    importers = {name: sorted(n for n, deps in import_graph().items() if name in deps) for name in COMMANDS}
    assert {name: who for name, who in importers.items() if who} == {}


def test_the_package_imports_down_the_pipeline_only():
    assert (ROOT / PACKAGE / "__init__.py").is_file()
    graph = import_graph()
    wrong = []
    for name, deps in graph.items():
        if not name.startswith(PACKAGE + "."):
            continue
        stage = name.split(".")[1]
        for dep in deps:
            top = dep.split(".")[0]
            if top != PACKAGE:
                wrong.append(f"{name} imports {dep} (outside the package)")
                continue
            if dep == PACKAGE:
                continue
            dep_stage = dep.split(".")[1]
            if dep_stage != stage and STAGE_RANK.get(dep_stage, 99) >= STAGE_RANK.get(stage, -1):
                wrong.append(f"{name} imports {dep} (stage {dep_stage} is not below {stage})")
    assert wrong == []


def test_the_package_never_edits_sys_path():
    files = list((ROOT / PACKAGE).rglob("*.py"))
    assert files
    edits = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in files
             for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
             and n.value.id == "sys"]
    assert edits == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The guard reads imports wherever they are: a late import closes a cycle as surely as a top one."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from export_model import _pixel_bounds\n    import rehearsal\n")
    assert imports_of("mod", src) >= {"export_model", "export_model._pixel_bounds", "rehearsal"}
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_each_command_is_a_short_leaf_over_its_module():
    """A command's docstring is its module's summary and usage lines and a pointer, never a second copy of
    the module's explanation (two copies drift; --help prints the module's)."""
    mods = kit_modules()
    for name in COMMANDS:
        tree = ast.parse(mods[name].read_text(encoding="utf-8"))
        mains = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and any(a.name == "main"
                                                                                    for a in n.names)]
        if not mains:
            continue  # ocr_dataset, custom_collator: re-exports
        module = ast.get_docstring(ast.parse(mods[mains[0].module].read_text(encoding="utf-8")))
        leaf = ast.get_docstring(tree)
        assert module and leaf and leaf.splitlines()[0] == module.splitlines()[0], name
        explanation = module.split("\n\n")[1:]
        repeated = [p for p in explanation if not p.startswith("    ") and p in leaf]
        assert not repeated, f"{name}.py repeats its module's docstring: {repeated[0][:60]}..."
        assert f"python {name}.py --help" in leaf and mains[0].module in leaf, name
        assert len(mods[name].read_text(encoding="utf-8").splitlines()) <= 25, name
