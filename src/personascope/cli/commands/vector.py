"""`vector info` / `vector list`: a vector's metadata, norms and validity report; the ready-made vectors
(`vector export` / `import`: commands/interop.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    console,
    fail,
)


def _validity(pv):
    from personascope.vectors import ValidityReport

    raw = pv.metadata.get("validity")
    if not raw:
        return None
    try:
        return ValidityReport.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        fail(f"{pv.path}: metadata field 'validity' is not a validity report ({type(e).__name__}: {e})")


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def vector_info(path: Annotated[Path, typer.Argument(help="Vector file or ready-made vector name.")]) -> None:
    """Print a vector's metadata, per-layer norms and validity report."""
    from personascope.vectors import load_vector

    try:
        pv = load_vector(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    report = _validity(pv)  # checked before anything is shown
    table = Table(title=str(pv.path))
    table.add_column("key")
    table.add_column("value", max_width=100)
    for k, v in sorted(pv.metadata.items()):
        if k not in ("validity", "steering"):
            table.add_row(k, v)
    table.add_row("spans", ", ".join(pv.vectors))
    table.add_row("shape", f"{pv.n_layers + 1} × {pv.hidden_size}")
    console.print(table)
    norms = pv.vectors["response_avg"].norm(dim=-1)
    console.print("‖v[l]‖: " + " ".join(f"{i}:{float(n):.2f}" for i, n in enumerate(norms)))
    if report is None:
        console.print("no validity report in this file (vectors from `personascope extract` carry one)")
    else:
        vt = Table(title=f"validity per layer (chosen layer {report.layer})")
        vt.add_column("layer")
        curves = {k: c for k, c in report.curves().items() if c is not None}
        for name in curves:
            vt.add_column(name.replace("_", " "))
        for i, layer in enumerate(report.layers):
            mark = " ←" if layer == report.layer else ""
            vt.add_row(f"{layer}{mark}", *(_fmt(c[i]) for c in curves.values()))
        console.print(vt)
        problems = report.problems()
        console.print(f"[bold]{'valid' if not problems else 'fails: ' + '; '.join(problems)}[/] at layer "
                      f"{report.layer}" + "".join(f"\n  note: {n}" for n in report.notes))
    if "steering" in pv.metadata:
        console.print(f"steering sweep: {pv.metadata['steering']}")


def vector_list() -> None:
    """The ready-made vectors that ship with personascope (use them by name: `--vector optimistic`)."""
    from personascope.vectors import load_vector, packaged_vectors

    found = packaged_vectors()
    if not found:
        console.print("this installation has no ready-made vectors")
        return
    table = Table(title="ready-made persona vectors (`--vector NAME`, or MODEL/NAME)")
    for col in ("name", "model", "layer", "held-out AUROC", "split-half cos", "ladder ρ", "label AUROC",
                "steering Δ trait (−α / +α)", "valid"):
        table.add_column(col)
    for model, trait, path in found:
        pv = load_vector(path)
        rep = _validity(pv)
        at = rep.at() if rep else {}
        steer = json.loads(pv.metadata.get("steering", "{}"))
        sides = [steer.get(k) for k in ("delta_minus", "delta_plus")]
        # a direction with no fluent α that moves the trait has no Δ (the sweep's fluency gate)
        delta = " / ".join("none" if d is None else f"{d:+.0f}" for d in sides) if steer else "—"
        table.add_row(trait, model, str(pv.best_layer), _fmt(at.get("held_out_auroc")),
                      _fmt(at.get("split_half_cosine")), _fmt(at.get("ladder_spearman")), _fmt(at.get("label_auroc")),
                      delta, "—" if rep is None else ("yes" if rep.valid else "no"))
    console.print(table)


def register(parent: typer.Typer) -> typer.Typer:
    """Attach `vector info` / `vector list` as the `vector` group; returns the group (more attach to it)."""
    group = typer.Typer(help="Inspect persona vectors and list the ready-made ones; export them as control "
                        "vectors (GGUF) or lm-eval steering files, and import GGUF control vectors.",
                        no_args_is_help=True)
    group.command("info")(vector_info)
    group.command("list")(vector_list)
    parent.add_typer(group, name="vector")
    return group
