"""What every command shares: the console, option types, one-line errors, loading models, judges and vectors."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in short name, local path or HF name.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, mps or cpu (default: best available).")]
JudgeModelOpt = Annotated[str, typer.Option("--judge-model", help="Local judge model (or the API model with "
                                                                   "--judge-url).")]
JudgeModeOpt = Annotated[str | None, typer.Option("--judge-mode", help="Trait scoring mode of a local judge: "
                                                  "contrastive, binary, 0_100 or fewshot.")]
ProfileOpt = Annotated[str, typer.Option(help="quick (CPU-sized), builtin (the ready-made vectors' settings) "
                                               "or paper (the paper's counts).")]
JudgeUrlOpt = Annotated[str | None, typer.Option("--judge-url", help="OpenAI-compatible base URL of an API judge "
                                                 "(--judge-model then names the API model).")]
EngineOpt = Annotated[str, typer.Option("--engine", help="hf, vllm or auto (the fastest for the job as measured "
                                          "on this machine: a short calibration, cached).")]



def print_error(msg: str) -> None:
    """One line `error: …` (never wrapped, never read as markup)."""
    console.print(f"[red]error:[/] {escape(' '.join(str(msg).split()))}", soft_wrap=True, highlight=False)


def fail(msg: str) -> NoReturn:
    """Print a one-line error (never wrapped, no markup read from `msg`) and exit with status 2."""
    print_error(msg)
    raise typer.Exit(2)


def is_user_error(e: BaseException) -> bool:
    """Errors a user's input causes (bad files, options, values): shown as one line, not a traceback.

    Set PERSONASCOPE_DEBUG=1 to see the traceback of a ValueError anyway.
    """
    from personascope.model import ModelNotFoundError
    from personascope.traits import TraitGenError

    if os.environ.get("PERSONASCOPE_DEBUG") == "1":
        return False
    return isinstance(e, ValueError | FileNotFoundError | IsADirectoryError | ModelNotFoundError | TraitGenError)


if TYPE_CHECKING:
    from typer._click.exceptions import ClickException, UsageError
else:  # typer's own click: a bad option value, missing argument, unknown option (found without a private import)
    UsageError = typer.BadParameter.__base__
    ClickException = UsageError.__base__


class CliGroup(TyperGroup):
    """The root command group: every user mistake ends in one `error: …` line and exit status 2."""

    def invoke(self, ctx: Any) -> Any:
        from ..printing import setup_output

        setup_output()
        try:
            return super().invoke(ctx)
        except Exception as e:
            if not is_user_error(e):
                raise
            fail(str(e) or type(e).__name__)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        extra["windows_expand_args"] = windows_expand_args
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as e:  # a bad option value, a missing argument, an unknown option
            if type(e).__name__ == "NoArgsIsHelpError":  # no command given: the usual help
                return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
            print_error(e.format_message())
            sys.exit(2)
        except ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def load_adapter(model: str, device: str | None, option: str = "--model"):
    """Load a model (showing a status line) as a ModelAdapter; a model that cannot be loaded is one line."""
    from personascope.model import ModelAdapter, ModelNotFoundError, load_model

    try:
        with console.status(f"loading {model} …"):
            m, tok = load_model(model, device=device)
    except (ModelNotFoundError, OSError, ValueError, KeyError, ImportError) as e:
        fail(f"{option} {model!r}: cannot load the model ({first_line(e)})")
    return ModelAdapter(m, tok)


def first_line(e: BaseException) -> str:
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0].strip() if lines else type(e).__name__


def check_judge_mode(judge_mode: str | None) -> None:
    """Refuse an unknown --judge-mode before any model is loaded."""
    from personascope.judges import TRAIT_MODES

    if judge_mode is not None and judge_mode not in TRAIT_MODES:
        fail(f"--judge-mode {judge_mode!r} is not a scoring mode; choose from {', '.join(TRAIT_MODES)}")


def load_judge(judge_model: str, judge_mode: str | None, device: str | None, judge_url: str | None = None):
    """The API or local judge; a bad combination of options or a missing model is a one-line error."""
    from personascope.judges import make_judge
    from personascope.model import ModelNotFoundError

    check_judge_mode(judge_mode)
    try:
        with console.status(f"loading judge {judge_model} …"):
            return make_judge(judge_model, judge_mode, judge_url, device)
    except (ModelNotFoundError, OSError) as e:
        fail(f"--judge-model {judge_model!r}: cannot load the model ({first_line(e)})")
    except ValueError as e:
        fail(str(e))


def floats(values: list[str] | str | float | None, option: str = "--coef") -> list[float]:
    """Finite numbers from repeated and/or comma-separated option values; anything else is a one-line error."""
    if isinstance(values, str | int | float):
        values = [str(values)]
    out = []
    for v in values or []:
        for x in str(v).split(","):
            if not x.strip():
                continue
            try:
                value = float(x)
            except ValueError:
                fail(f"{option} {x.strip()!r} is not a number")
            if not math.isfinite(value):
                fail(f"{option} {x.strip()!r} must be a finite number")
            out.append(value)
    return out


def ints(values: list[str] | str | None, option: str = "--layer") -> list[int]:
    """Whole numbers (e.g. layer indices) from repeated and/or comma-separated values; '1.7' is refused."""
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values or []:
        for x in str(v).split(","):
            if not x.strip():
                continue
            try:
                out.append(int(x.strip()))
            except ValueError:
                fail(f"{option} {x.strip()!r} is not a whole number")
    return out


def finite_number(ctx: typer.Context, param: typer.CallbackParam, value: float | None) -> float | None:
    """Option callback: refuse inf and nan (which a float option accepts)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} must be a finite number", ctx=ctx, param_hint=param.opts)
    return value


def choice(value: str, allowed: Any, option: str) -> str:
    """`value` if it is one of `allowed`, else a one-line error listing them."""
    if value not in allowed:
        fail(f"{option} {value!r} is not one of {', '.join(allowed)}")
    return value


def load_trait_or_fail(spec: str, hint: str = ""):
    """The trait by built-in name or path; a malformed or missing one is a one-line error naming the file."""
    from personascope.traits import TraitError, load_trait

    try:
        return load_trait(spec)
    except TraitError as e:
        fail(f"{e}{hint}")


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
    from personascope.vectors import VectorMismatchError, load_vector

    if path is None:
        return None
    try:
        pv = load_vector(path, model=adapter.name)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        fail(str(e))
    return pv


def start_engines(engine: str, adapter, judge, n_answers: int, new_tokens: int):
    """The engine --engine resolves to, measured on this machine (cached), with its choice and timings printed;
    None keeps generation and judging on the loaded HF model (the in-process path)."""
    from personascope.runtime.engines import make_engine, make_judge_engine, resolve_engine, work_tokens

    work = work_tokens(n_answers, 100, new_tokens)
    with console.status("measuring the engines on this machine (once per machine and model) …"):
        picked = resolve_engine(engine, adapter, work)
    console.print(picked.line(), soft_wrap=True, highlight=False)
    if picked.engine == "hf":
        return None
    with console.status(f"starting the {picked.engine} engine …"):
        gen = make_engine(picked.engine, adapter, work, dtype=picked.torch_dtype)
        used = make_judge_engine(picked.engine, judge, 2 * n_answers)
    console.print(f"engines: generation {gen.name}" + (f", judge {used}" if used else ""))
    return gen
