"""`vector info`: a vector file's metadata and per-layer norms (`vector export` / `import`: commands/interop.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import (
    console,
    fail,
)


def vector_info(path: Path) -> None:
    """Print a vector file's metadata and per-layer norms."""
    from ..vectors import load_vector

    try:
        pv = load_vector(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    table = Table(title=str(path))
    table.add_column("key")
    table.add_column("value")
    for k, v in sorted(pv.metadata.items()):
        table.add_row(k, v)
    table.add_row("spans", ", ".join(pv.vectors))
    table.add_row("shape", f"{pv.n_layers + 1} × {pv.hidden_size}")
    console.print(table)
    norms = pv.vectors["response_avg"].norm(dim=-1)
    console.print("‖v[l]‖: " + " ".join(f"{i}:{float(n):.2f}" for i, n in enumerate(norms)))


def register(parent: typer.Typer) -> typer.Typer:
    """Attach `vector info` as the `vector` group; returns the group (more vector commands attach to it)."""
    group = typer.Typer(help="Inspect persona vector files; export them as control vectors (GGUF) or lm-eval "
                        "steering files, and import GGUF control vectors.", no_args_is_help=True)
    group.command("info")(vector_info)
    parent.add_typer(group, name="vector")
    return group
