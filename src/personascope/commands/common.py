"""What every command shares: the console, option types, one-line errors, loading models, judges and vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in short name, local path or HF name.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, mps or cpu (default: best available).")]
JudgeModelOpt = Annotated[str, typer.Option("--judge-model", help="Local judge model (or the API model with "
                                                                   "--judge-url).")]
JudgeModeOpt = Annotated[str | None, typer.Option("--judge-mode", help="Trait scoring mode of a local judge: "
                                                  "contrastive, binary, 0_100 or fewshot.")]
ProfileOpt = Annotated[str, typer.Option(help="quick (CPU-sized) or paper (the paper's counts).")]
JudgeUrlOpt = Annotated[str | None, typer.Option("--judge-url", help="OpenAI-compatible base URL of an API judge "
                                                 "(--judge-model then names the API model).")]


def fail(msg: str) -> NoReturn:
    """Print a one-line error and exit with status 2."""
    console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


def load_adapter(model: str, device: str | None):
    """Load a model (showing a status line) as a ModelAdapter."""
    from ..adapter import ModelAdapter
    from ..models import load_model

    with console.status(f"loading {model} …"):
        m, tok = load_model(model, device=device)
    return ModelAdapter(m, tok)


def load_judge(judge_model: str, judge_mode: str | None, device: str | None, judge_url: str | None = None):
    """The API or local judge; a bad combination of options is a one-line error."""
    from ..api_judge import make_judge

    try:
        with console.status(f"loading judge {judge_model} …"):
            return make_judge(judge_model, judge_mode, judge_url, device)
    except ValueError as e:
        fail(str(e))


def floats(values: list[str] | None) -> list[float]:
    """Numbers from repeated and/or comma-separated option values."""
    out = []
    for v in values or []:
        out += [float(x) for x in str(v).split(",") if x.strip()]
    return out


def load_vector_for(adapter, path: Path | None):
    """The vector file at `path` checked against the model (None when no path); errors are one line."""
    from ..vectors import VectorMismatchError, load_vector

    if path is None:
        return None
    try:
        pv = load_vector(path)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        fail(str(e))
    return pv


