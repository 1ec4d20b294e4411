"""`shift`: how far a finetune moved the model along a persona vector, with judged scores and capability."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from personascope.model import DEFAULT_JUDGE_MODEL

from .common import (
    LAYER,
    NEW_TOKENS,
    QUESTIONS,
    DeviceOpt,
    JudgeModelOpt,
    JudgeModeOpt,
    JudgeUrlOpt,
    console,
    fail,
    load_adapter,
    load_judge,
    load_trait_or_fail,
    load_vector_for,
)


def shift_cmd(
    vector: Annotated[Path, typer.Option(help="Persona vector file.")],
    finetuned: Annotated[Path, typer.Option(help="Adapter directory of the finetuned model.")],
    base: Annotated[str, typer.Option(help="Base model (default: the one the adapter names).")] = "",
    trait: Annotated[str | None, typer.Option(help="Trait (default: the vector's).")] = None,
    layer: Annotated[int | None, LAYER.option("Layer (default: the vector's layer).")] = None,
    questions: Annotated[int | None, QUESTIONS.option("Use the first N evaluation questions (default 8).")] = 8,
    max_new_tokens: Annotated[int | None, NEW_TOKENS.option("Answer length for the judged evaluation.")] = None,
    judge: Annotated[bool, typer.Option(help="Judge trait score and coherence (--no-judge: shift only).")] = True,
    capability: Annotated[bool, typer.Option(help="Multiple-choice accuracy before and after.")] = True,
    capability_file: Annotated[Path | None, typer.Option(help="MMLU-style JSONL (default: built-in).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/shift-ADAPTER).")] = None,
    trajectory: Annotated[Path | None, typer.Option(help="persona_shift.jsonl logged during training (default: "
                                                         "the adapter's own, when it was watched); plotted beside "
                                                         "the final shift.")] = None,
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    judge_mode: JudgeModeOpt = None,
    judge_url: JudgeUrlOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Finetuning shift along a persona vector at every layer, plus judged trait score and capability."""
    from personascope.evaluation import load_mc
    from personascope.finetuning import run_shift
    from personascope.model import ModelAdapter, adapter_base_name, is_adapter_dir, load_finetuned

    from ..printing import print_eval_rows

    if not is_adapter_dir(finetuned):
        fail(f"{finetuned} is not an adapter directory (no adapter_config.json)")
    traj = _read_trajectory(trajectory, finetuned)
    base_name = base or adapter_base_name(finetuned)
    base_adapter = load_adapter(base_name, device)
    pv = load_vector_for(base_adapter, vector)
    t = load_trait_or_fail(trait or pv.trait, " (pass --trait)")
    try:
        la = base_adapter.check_layer(pv.default_layer(layer))
    except ValueError as e:
        fail(f"--layer: {e}")
    with console.status(f"loading {finetuned} …"):
        ft_adapter = ModelAdapter(*load_finetuned(base_name, finetuned, device=device))
    j = load_judge(judge_model, judge_mode, device, judge_url) if judge else None
    mc = load_mc(capability_file) if capability else None
    try:
        rep = run_shift(base_adapter, ft_adapter, t, pv, out or Path("runs") / f"shift-{Path(finetuned).name}", la,
                        questions, j, max_new_tokens, mc,
                        names={"base": base_name, "finetuned": str(finetuned), "vector": str(vector)})
    except ValueError as e:
        fail(str(e))
    res = rep.shift
    table = Table(title=f"finetuning shift of {finetuned} along {t.name} (last prompt token, "
                        f"{res.n_prompts} eval prompts)")
    table.add_column("layer")
    table.add_column("shift (a_ft − a_base)·v̂")
    for i, s in enumerate(res.per_layer):
        mark = " ◀ chosen" if i == res.layer else ""
        table.add_row(str(i), f"{s:+.3f}{mark}")
    console.print(table)
    if j is not None:
        print_eval_rows(rep.eval_rows, f"{t.name}: base vs finetuned (judge {j.name}, {j.mode_for('trait')})")
    if rep.capability is not None:
        console.print(f"capability accuracy: base {rep.capability['base']:.3f} → finetuned "
                      f"{rep.capability['finetuned']:.3f} (n={rep.n_capability})")
    console.print(f"shift at layer {res.layer}: [bold]{res.shift:+.3f}[/]")
    if traj is not None:
        _plot_beside(traj, t.name, res.layer, res.shift, rep.run_dir / "shift_trajectory.png")
    console.print(f"results: {rep.run_dir / 'shift.json'}, plot {rep.run_dir / 'shift.png'}")
    console.print(f"mitigate after the fact: personascope evaluate {t.name} --model {finetuned} "
                  f"--vector {vector} --layer {res.layer} --alpha -0.5")


def _read_trajectory(path: Path | None, finetuned: Path) -> tuple[list[dict], list[dict]] | None:
    """The logged trajectory (given, or the adapter's own when present); a bad file fails in one line."""
    from personascope.finetuning import ShiftInputError, read_trajectory

    if path is None and not (finetuned / "persona_shift.jsonl").exists():
        return None
    try:
        return read_trajectory(path or finetuned)
    except (FileNotFoundError, ShiftInputError) as e:
        fail(f"--trajectory: {e}")


def _plot_beside(traj: tuple[list[dict], list[dict]], name: str, layer: int, shift: float, path: Path) -> None:
    """Plot the logged shift per step with this measurement's final shift beside it (same trait and layer)."""
    from personascope.finetuning import plot_trajectory

    rows, events = traj
    logged = rows[-1]["values"].get(name) if rows else None
    same = logged is not None and logged["layer"] == layer
    plot_trajectory(rows, events, path, f"persona shift during training; final measured afterwards ({name})",
                    final={name: shift} if same else None)
    if same and logged is not None:
        console.print(f"logged during training: {name} {logged['shift']:+.3f} at step {rows[-1]['step']} "
                      f"(probe of {len(rows)} measurements); plot {path}")
    else:
        console.print(f"trajectory plotted to {path} (it does not log {name} at layer {layer})")


def register(app: typer.Typer) -> None:
    """Attach `shift`."""
    app.command("shift")(shift_cmd)
