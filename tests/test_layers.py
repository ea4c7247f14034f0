"""The package layers import strictly downwards and nothing imports in a circle.

ldm (models, checkpoints, LoRA math) < pipelines (inference) < training < server (the HTTP API)
< cli (the ``ldm`` command).
Every import statement counts, the ones inside functions too: a lazy import of a higher layer is
still a dependency on it, and a lazy cycle still ties two modules together.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ldm", "pipelines", "training", "server", "cli")


def module_files(root: Path, packages=LAYERS) -> dict[str, Path]:
    """Dotted module name → file, for every module of the given top-level packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) lives in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import name": a submodule, or a name defined in pkg itself
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path, packages=LAYERS) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    rank = {name: i for i, name in enumerate(layers)}
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if rank[t.split(".")[0]] > rank[m.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_import_only_downwards():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_benchmarks_use_the_packages_not_the_tests():
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tests":
                offenders.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tests" for a in node.names):
                offenders.append(f"{path.name} imports tests")
        if "sys.path" in text:
            offenders.append(f"{path.name} edits sys.path")
    assert offenders == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_an_upward_import_even_inside_a_function(tmp_path):
    root = _tree(tmp_path, {
        "ldm/__init__.py": "", "ldm/model.py": "def f():\n    from pipelines.pipeline import P\n",
        "pipelines/__init__.py": "", "pipelines/pipeline.py": "from ldm import model\nP = 1\n",
        "training/__init__.py": "", "cli/__init__.py": ""})
    graph = import_graph(root)
    assert graph["pipelines.pipeline"] == {"ldm.model"}
    assert upward_imports(graph) == ["ldm.model imports pipelines.pipeline"]


def test_checker_finds_a_relative_import_cycle(tmp_path):
    root = _tree(tmp_path, {
        "ldm/__init__.py": "", "ldm/a.py": "from .b import x\n", "ldm/b.py": "from . import c\nx = 1\n",
        "ldm/c.py": "def g():\n    from ldm.a import y\n",
        "pipelines/__init__.py": "", "training/__init__.py": "", "cli/__init__.py": ""})
    graph = import_graph(root)
    assert cycles(graph) == [["ldm.a", "ldm.b", "ldm.c"]]
    assert upward_imports(graph) == []
