"""`traits list` and `traits show`: the built-in traits and a validated view of any trait file
(`traits new` is attached by commands/serve.py, since it talks to a served model)."""

from __future__ import annotations

import typer
from rich.table import Table

from .common import (
    console,
    load_trait_or_fail,
)


def traits_list() -> None:
    """List the built-in traits."""
    from personascope.traits import builtin_traits, load_trait

    table = Table(title="built-in traits")
    for col in ("name", "antonym", "extract q", "eval q", "first pos instruction"):
        table.add_column(col)
    for name in builtin_traits():
        t = load_trait(name)
        table.add_row(name, t.antonym or "helpful", str(len(t.extract_questions)), str(len(t.eval_questions)),
                      t.instructions[0]["pos"][:70] + "…")
    console.print(table)


def traits_show(name_or_path: str) -> None:
    """Validate and show a trait (built-in name or a JSON file / directory)."""

    t = load_trait_or_fail(name_or_path)
    console.print(f"[bold]{t.name}[/]  ({t.source})")
    table = Table(title="instructions (system prompts)")
    table.add_column("#")
    table.add_column("pos")
    table.add_column("neg")
    for i in range(len(t.instructions)):
        table.add_row(str(i), t.system_prompt("pos", i), t.system_prompt("neg", i))
    console.print(table)
    for title, qs in (("extraction questions", t.extract_questions), ("evaluation questions", t.eval_questions)):
        qt = Table(title=title)
        qt.add_column("#")
        qt.add_column("question")
        for i, q in enumerate(qs):
            qt.add_row(str(i), q)
        console.print(qt)
    console.print("[bold]judge rubric[/]")
    console.print(t.eval_prompt, markup=False)


def register(parent: typer.Typer) -> typer.Typer:
    """Attach `traits list` and `traits show` as the `traits` group; returns the group."""
    group = typer.Typer(help="List, show and validate trait data.", no_args_is_help=True)
    group.command("list")(traits_list)
    group.command("show")(traits_show)
    parent.add_typer(group, name="traits")
    return group
