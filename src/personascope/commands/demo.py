"""`demo`: the main job on the embedded model (extract a vector, then steer with it)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..models import DEFAULT_MODEL
from .common import (
    DeviceOpt,
    ModelOpt,
)


def demo(
    trait: str = "optimistic",
    model: ModelOpt = DEFAULT_MODEL,
    out: Path = Path("runs/demo"),
    device: DeviceOpt = None,
) -> None:
    """The main job on the embedded model: extract a vector, then steer with it side by side."""
    from ..demo import run_demo

    run_demo(trait, model, out, device)


def register(app: typer.Typer) -> None:
    """Attach `demo`."""
    app.command()(demo)
