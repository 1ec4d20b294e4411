"""The `personascope` command line: assembles the typer app from the command groups in `commands/`."""

from __future__ import annotations

import typer

from .commands import (
    demo,
    drift,
    evaluate,
    extract,
    finetune,
    guard,
    interop,
    judge,
    monitor,
    screen,
    serve,
    shift,
    traits,
    vector,
)
from .commands.common import CliGroup

app = typer.Typer(help="Find, monitor and control character traits (persona vectors) in language models.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, cls=CliGroup)
traits_app = traits.register(app)  # traits list / show (and `traits new`, attached by commands/serve.py)
vector_app = vector.register(app)  # vector info (export / import attached by commands/interop.py)


def _register_command_groups() -> None:
    for module in (extract, evaluate, judge, demo, monitor, finetune, shift, screen, guard, drift):
        module.register(app)
    serve.register(app, traits_app)  # `serve` and `traits new` (which talks to a served model)
    interop.register(vector_app)  # `vector export` / `vector import` (llama.cpp, repeng, EasySteer, lm-eval)


_register_command_groups()

if __name__ == "__main__":
    app()
