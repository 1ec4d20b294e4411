"""The package's shape: one folder per noun of the paper, no circles, faces only across packages, a quiet library."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "personascope"
# a package is a folder under personascope/ (runtime's two engines are packages of their own); cli is one unit
UNITS = ("runtime.engines", "runtime.cluster")


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "runtime" and len(parts) > 1:
        return f"runtime.{parts[1]}"
    return parts[0] if (SRC / parts[0]).is_dir() else ""


def _module_of(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every `from X import` in a file, relative ones resolved."""
    module = _module_of(path) if SRC in path.parents else ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("personascope"):
                out.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("personascope")]
    return out


def test_cross_package_imports_use_the_package_face():
    """Inside the library, another package is reached only through its `__init__` (its private modules stay so)."""
    bad = []
    for path in SRC.rglob("*.py"):
        own = _unit(_module_of(path))
        for line, target in _imports(path):
            tu = _unit(target)
            if tu and tu != own and target != f"personascope.{tu}":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["experiments", "bench"])
def test_scripts_import_only_package_faces(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for line, target in _imports(path):
            tu = _unit(target)
            if target != "personascope" and (not tu or target != f"personascope.{tu}"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """No module reaches itself through imports (type-only imports included)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("personascope", exclude_type_checking_imports=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    # the root face imports every package and they import personascope._version: not a cycle of code
    cycles = [c for c in cycles if c != ["personascope"]]
    assert not cycles, cycles


def test_import_personascope_is_light_and_leaves_matplotlib_alone():
    code = ("import sys, json, personascope; "
            "print(json.dumps([m for m in ('matplotlib', 'fastapi', 'uvicorn', 'ray', 'rich', 'vllm') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_face_is_small_and_shadows_no_module():
    import personascope

    names = [n for n in personascope.__all__ if not n.startswith("__")]
    assert len(names) <= 12, names
    submodules = {p.stem for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert not set(names) & submodules
    for n in personascope.__all__:
        assert getattr(personascope, n) is not None


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n}" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 420]
    assert not big, big


def test_library_never_prints():
    """Outside the CLI no module calls print() or imports rich: results are returned, the rest is logged."""
    bad = []
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} print()")
            mods = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] == "rich"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["experiments", "bench"])
def test_scripts_import_names_the_faces_export(folder):
    """Every name a script imports from a package face exists there (a moved name breaks no script silently)."""
    import importlib

    missing = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("personascope"):
                mod = importlib.import_module(node.module or "")
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name)]
    assert not missing, "\n".join(missing)
