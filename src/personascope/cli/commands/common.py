"""What every command shares: the console, option types, one-line errors, loading models, judges and vectors."""

from __future__ import annotations

import errno
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


# ------------------------------------------------------------------ numeric options: every range declared once


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, within [lo, hi] (an open end excludes it).

    Checked while the command line is parsed (`option`), so a bad value ends the command before
    any model is loaded or any file is written.
    """

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        lo = f"{num(self.lo)} <" if self.lo_open else f"{num(self.lo)} ≤"
        hi = f"< {num(self.hi)}" if self.hi_open else f"≤ {num(self.hi)}"
        return f"{lo} x {hi}"

    def problem(self, value: float) -> str | None:
        """Why `value` is refused (None when it is accepted)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value!r} must be a finite number"
        too_low = value < self.lo or (self.lo_open and value == self.lo)
        too_high = value > self.hi or (self.hi_open and value == self.hi)
        if too_low or too_high:
            shown = f"{value:g}" if isinstance(value, float) else (str(value) if abs(value) < 10**12 else
                                                                    f"a {len(str(abs(value)))}-digit number")
            return f"{shown} is out of range; it must be {self.describe()}"
        return None

    def check(self, value: float, option: str) -> float:
        """`value` when accepted, else a one-line error naming `option` (exit 2)."""
        why = self.problem(value)
        if why is not None:
            fail(f"{option}: {why}")
        return value

    def callback(self, ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        """Click callback: refuse a parsed value outside the range (None, an unset option, passes)."""
        for v in value if isinstance(value, list | tuple) else [value]:
            why = None if v is None else self.problem(v)
            if why is not None:
                raise typer.BadParameter(why, ctx=ctx, param=param)  # type: ignore[arg-type]
        return value

    def option(self, help: str | None = None, *decls: str, **kw: Any) -> Any:
        """A typer.Option checked against this range (the range is shown in --help)."""
        text = f"{help + ' ' if help else ''}[{self.describe()}]"
        return typer.Option(*decls, help=text, callback=self.callback, **kw)


MAX_SEED = 2**32 - 1
COUNT = Range(1, 1_000_000)  # rows, questions drawn from a pool, steps: at least one
SAMPLES = Range(1, 10_000)
QUESTIONS = Range(1, 20)  # a trait has 20 extraction and 20 evaluation questions
NEW_TOKENS = Range(1, 32_768)
TEMPERATURE = Range(0, 5)  # 0 decodes greedily
TOP_P = Range(0, 1, lo_open=True)
BATCH = Range(1, 4_096)
SEED = Range(0, MAX_SEED)
SCORE = Range(0, 100)  # judge scores and thresholds on them
LAYER = Range(0, 1_000)  # checked against the model once it is loaded
COEF = Range(-1_000, 1_000)  # raw steering coefficient
ALPHA = Range(-10, 10)  # relative coefficient, as the server's limit
PROJECTION = Range(-1e6, 1e6)  # thresholds on projections and ΔP
PERCENT = Range(0, 100)
WORKERS = Range(1, 1_024)
ATTEMPTS = Range(1, 100)
EPOCHS = Range(1, 1_000)
LR = Range(0, 1, lo_open=True)  # a learning rate
CONTEXT = Range(1, 1_048_576)  # a token length limit
GPUS = Range(0, 64, lo_open=True)


def ranged(values: list[int] | list[float], rng: Range, option: str) -> Any:
    """`values` when every one is in `rng`, else a one-line error naming `option`."""
    for v in values:
        rng.check(v, option)
    return values




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
    from personascope.judges import JudgeAPIError
    from personascope.model import ModelNotFoundError
    from personascope.traits import TraitGenError

    if os.environ.get("PERSONASCOPE_DEBUG") == "1":
        return False
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:  # a read-only folder, a full disk, …
        return True
    return isinstance(e, ValueError | FileNotFoundError | IsADirectoryError | ModelNotFoundError | TraitGenError
                      | RecursionError | JudgeAPIError)


# what the machine, not the program, gets wrong when writing or reading a run: shown as one line
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT, errno.EFBIG,
                      errno.EMFILE, errno.EXDEV}


def error_text(e: BaseException) -> str:
    """One line for a user's or the machine's error (a bare RecursionError says what it means)."""
    if isinstance(e, RecursionError):
        return "a JSON value is nested too deeply to read (RecursionError)"
    return str(e) or type(e).__name__


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
            fail(error_text(e))

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

    base = adapter_base(model, option)
    try:
        with console.status(f"loading {model} …"):
            m, tok = load_model(model, device=device)
            adapter = ModelAdapter(m, tok)
    except Exception as e:  # a folder without a tokenizer, a broken config, …: whatever it is, say which model
        if os.environ.get("PERSONASCOPE_DEBUG") == "1" and not isinstance(e, ModelNotFoundError):
            raise
        fail(f"{option} {model!r}: cannot load the model ({type(e).__name__}: {first_line(e)})")
    if not adapter.tokenizer("Hello, world.", add_special_tokens=False)["input_ids"]:
        fail(f"{option} {model!r}: its tokenizer turns text into no tokens (does the folder lack the tokenizer "
             "files?)")
    if base is not None:
        console.print(f"loaded the adapter {model} on its base model {base}", highlight=False, soft_wrap=True)
    return adapter


def adapter_base(model: str, option: str = "--model") -> str | None:
    """The base model of a PEFT adapter folder (None for a plain model); a base that is not there is one line."""
    from personascope.model import BUILTIN_MODELS, adapter_base_name, is_adapter_dir

    if not is_adapter_dir(model):
        return None
    try:
        base = adapter_base_name(model)
    except (ValueError, OSError) as e:
        fail(f"{option} {model!r}: cannot read the adapter's base model ({first_line(e)})")
    hub_allowed = os.environ.get("PERSONASCOPE_ALLOW_DOWNLOAD") == "1" and not base.startswith((".", "/", "~"))
    if base not in BUILTIN_MODELS and not Path(base).exists() and not hub_allowed:
        fail(f"{option} {model!r} is an adapter on the base model {base!r}, which is not there (from "
             f"{Path.cwd()}); pass the base explicitly or put it back")
    return base


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


def floats(values: list[str] | str | float | None, option: str = "--coef", rng: Range | None = None) -> list[float]:
    """Finite numbers (within `rng` when given) from repeated and/or comma-separated option values; anything else
    is a one-line error."""
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
            if rng is not None:
                rng.check(value, option)
            out.append(value)
    return out


def ints(values: list[str] | str | None, option: str = "--layer", rng: Range | None = None) -> list[int]:
    """Whole numbers (e.g. layer indices; within `rng` when given) from repeated and/or comma-separated values;
    '1.7' is refused."""
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values or []:
        for x in str(v).split(","):
            if not x.strip():
                continue
            try:
                value = int(x.strip())
            except ValueError:
                fail(f"{option} {x.strip()!r} is not a whole number")
            if rng is not None:
                rng.check(value, option)
            out.append(value)
    return out


def finite_number(ctx: typer.Context, param: typer.CallbackParam, value: float | None) -> float | None:
    """Option callback: refuse inf and nan (which a float option accepts)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} must be a finite number", ctx=ctx, param_hint=param.opts)
    return value


def check_out_dir(out: Path | None, force: bool = False, option: str = "--out") -> None:
    """Refuse, before any model is loaded, an output folder that is a file or (with --force) a symbolic link."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file, not a folder; choose another {option}")
    if force and out.is_symlink():
        fail(f"{option} {out} is a symbolic link; --force does not delete what it points to: name the folder "
             f"itself ({out.resolve()})")


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
    Console(stderr=True).print(picked.line(), soft_wrap=True, highlight=False)  # a note, not the result
    if picked.engine == "hf":
        return None
    with console.status(f"starting the {picked.engine} engine …"):
        gen = make_engine(picked.engine, adapter, work, dtype=picked.torch_dtype)
        used = make_judge_engine(picked.engine, judge, 2 * n_answers)
    console.print(f"engines: generation {gen.name}" + (f", judge {used}" if used else ""))
    return gen
