"""What every command shares: the console, option types, one-line errors, loading models, judges and vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
T = TypeVar("T")

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
    """Print a one-line error (never wrapped, no markup read from `msg`) and exit with status 2."""
    console.print(f"[red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
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


def _numbers(values: list[str] | str | None, option: str, convert: Callable[[str], T], what: str) -> list[T]:
    out = []
    for v in [values] if isinstance(values, str) else values or []:
        for x in str(v).split(","):
            if not x.strip():
                continue
            try:
                out.append(convert(x))
            except ValueError:
                fail(f"{option} takes {what} (comma-separated or repeated), got {x.strip()!r}")
    return out


def load_trait_or_fail(spec: str, hint: str = ""):
    """The trait by built-in name or path; a malformed or missing one is a one-line error naming the file."""
    from ..traits import TraitError, load_trait

    try:
        return load_trait(spec)
    except TraitError as e:
        fail(f"{e}{hint}")


def floats(values: list[str] | str | None, option: str = "option") -> list[float]:
    """Numbers from repeated and/or comma-separated option values; a bad one is a one-line error naming `option`."""
    return _numbers(values, option, float, "numbers")


def ints(values: list[str] | str | None, option: str) -> list[int]:
    """Integers from repeated and/or comma-separated option values; a bad one is a one-line error naming `option`."""
    return _numbers(values, option, int, "integers")


def check_layers(adapter, layers: list[int], option: str) -> list[int]:
    """The layers, each checked against the model; one out of range is a one-line error naming `option`."""
    for la in layers:
        try:
            adapter.check_layer(la)
        except ValueError as e:
            fail(f"{option}: {e}")
    return layers


def alpha_to_coef(pv, alpha: float, layer: int, alpha_option: str = "--alpha", coef_option: str = "--coef") -> float:
    """The raw coefficient of a relative α at a layer; a vector without resid_norm is a one-line error."""
    try:
        return pv.coef_from_alpha(alpha, layer)
    except ValueError as e:
        fail(f"{alpha_option} {alpha:g}: {e} ({coef_option})")


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


