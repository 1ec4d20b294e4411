"""The README and the guides run as written: every python / bash code block is executed here or says why not.

A block is marked by an HTML comment on the line before it (invisible on GitHub and in the site):

- no marker: runs in `make test` (it must be quick and need no real model);
- `<!-- docs-test: model -->`: needs the built-in qwen2.5-coder-0.5b; runs under `pytest -m model`;
- `<!-- docs-test: skip REASON -->`: not runnable here (a GPU, an API key, a cluster, hours of CPU); REASON is required.

Per page, the python blocks run in order in one namespace (a later block may use an earlier one's names); bash
blocks run alone with `bash -euo pipefail` in a scratch directory, `personascope` being this checkout's CLI.
The tutorial notebook runs under `-m model` here and in CI by `make notebook`.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOTEBOOKS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))
RUN_LANGS = {"python", "py", "bash", "sh", "shell"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
MARK = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>model|skip)\b\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str  # "ci", "model" or "skip"
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page with their docs-test marker."""
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], (m["info"].split() or [""])[0].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(prev.strip())
        kind = mark["kind"] if mark else "ci"
        out.append(Block(page, start + 1, lang, "\n".join(body) + "\n", kind, mark["reason"] if mark else ""))
    return out


ALL = [b for page in PAGES for b in blocks(page) if b.lang in RUN_LANGS]


def _cli_shim(tmp: Path) -> dict[str, str]:
    """An environment whose `personascope` (and `python`) is this checkout's, run by this interpreter."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, target in (("personascope", "-m personascope.cli"), ("python", "")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("COLUMNS", "120")
    return env


def run_python(page_blocks: list[Block], tmp: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp)
    namespace: dict = {"__name__": "__docs__"}
    for b in page_blocks:
        try:
            exec(compile(b.code, b.id, "exec"), namespace)  # noqa: S102  (the docs' own code)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"python block at {b.id} failed: {type(e).__name__}: {e}") from e


def run_bash(b: Block, tmp: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=tmp, env=_cli_shim(tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bash block at {b.id} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def _pages_with(kinds: set[str]) -> list[Path]:
    return sorted({b.page for b in ALL if b.kind in kinds and b.lang in ("python", "py")})


def test_every_block_is_runnable_or_says_why_not():
    assert ALL, "no code blocks found"
    bad = [b.id for b in ALL if b.kind == "skip" and not b.reason]
    assert not bad, f"docs-test: skip needs a reason: {bad}"
    readme = [b for b in ALL if b.page.name == "README.md"]
    assert any(b.kind != "skip" and b.lang == "python" for b in readme), "the README's Python example must run"


def test_readme_has_install_and_example_in_the_first_40_lines():
    head = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")[:40]
    assert any("pip install" in line for line in head)
    assert any(line.startswith("from personascope import") for line in head)


@pytest.mark.parametrize("page", _pages_with({"ci"}), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks(page, tmp_path, monkeypatch):
    run_python([b for b in ALL if b.page == page and b.lang in ("python", "py") and b.kind == "ci"], tmp_path,
               monkeypatch)


@pytest.mark.model
@pytest.mark.parametrize("page", _pages_with({"model"}), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_on_the_builtin_model(page, tmp_path, monkeypatch):
    run_python([b for b in ALL if b.page == page and b.lang in ("python", "py") and b.kind in ("ci", "model")],
               tmp_path, monkeypatch)


@pytest.mark.parametrize("block", [b for b in ALL if b.lang not in ("python", "py") and b.kind == "ci"],
                         ids=lambda b: b.id)
def test_bash_blocks(block, tmp_path):
    run_bash(block, tmp_path)


@pytest.mark.model
@pytest.mark.parametrize("block", [b for b in ALL if b.lang not in ("python", "py") and b.kind == "model"],
                         ids=lambda b: b.id)
def test_bash_blocks_on_the_builtin_model(block, tmp_path):
    run_bash(block, tmp_path)


@pytest.mark.model
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(notebook, tmp_path):
    """The same run as `make notebook` (CI): every cell, in order, on the built-in 0.5B."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(notebook, as_version=4)
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env_path) if p)
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if env_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_path


def test_notebooks_are_committed_without_outputs():
    """CI re-runs the notebook; stale outputs in git would show results the code no longer gives."""
    import json

    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        stale = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count")]
        assert not stale, f"{nb.name}: cells {stale} carry outputs; clear them (make notebook writes a run copy)"
