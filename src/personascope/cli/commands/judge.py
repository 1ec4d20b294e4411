"""`judge-eval`: a local judge's agreement with the shipped labelled answers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from personascope.model import DEFAULT_JUDGE_MODEL

from .common import (
    COUNT,
    DeviceOpt,
    JudgeModelOpt,
    console,
)


def judge_eval(
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    mode: Annotated[list[str] | None, typer.Option("--mode", help="Trait modes to compare (repeatable).")] = None,
    coherence_mode: Annotated[list[str] | None, typer.Option("--coherence-mode")] = None,
    trait: Annotated[list[str] | None, typer.Option("--trait", help="Limit to these traits.")] = None,
    limit: Annotated[int | None, COUNT.option("Rows per set (balanced).")] = None,
    labelled: Annotated[str, typer.Option("--set", help="Labelled answers: written (clear-cut text) or real "
                                          "(answers of the built-in models, labelled by reading).")] = "written",
    out: Path = Path("runs/judge-eval"),
    device: DeviceOpt = None,
) -> None:
    """Measure a judge's agreement with the shipped labelled answers (AUC, accuracy, calibration)."""
    from personascope.judges import DEFAULT_COHERENCE_MODE, DEFAULT_TRAIT_MODE, compare_modes
    from personascope.model import load_model

    m, tok = load_model(judge_model, device=device)
    rows = compare_modes(m, tok, f"local:{judge_model}", mode or [DEFAULT_TRAIT_MODE],
                         coherence_mode or [DEFAULT_COHERENCE_MODE], trait, limit, out, labelled)
    table = Table(title=f"judge agreement: local:{judge_model}")
    for col in ("set", "mode", "AUC", "acc@50", "mean +", "mean −", "missing", "s/judgement"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["mode"], f"{r['auc']:.3f}", f"{r['accuracy']:.2f}", f"{r['mean_pos']:.1f}",
                      f"{r['mean_neg']:.1f}", str(r["missing"]), f"{r['seconds_per_judgement']:.2f}")
    for tm in mode or [DEFAULT_TRAIT_MODE]:
        aucs = [r["auc"] for r in rows if r["mode"] == tm and r["name"] != "coherence"]
        if aucs:
            table.add_row("[bold]mean (traits)", tm, f"{sum(aucs) / len(aucs):.3f}", "", "", "", "", "")
    console.print(table)
    console.print(f"wrote {out / 'judge_eval.json'} and reliability plots")


def register(app: typer.Typer) -> None:
    """Attach `judge-eval`."""
    app.command("judge-eval")(judge_eval)
