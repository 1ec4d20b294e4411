"""`demo`: the main job on the embedded model (extract a vector, check it, then steer with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_MODEL

from .common import (
    SEED,
    DeviceOpt,
    EngineOpt,
    ModelOpt,
    Range,
    choice,
    fail,
)

DEMO_QUESTIONS = Range(2, 20)  # the demo splits them into extraction and evaluation halves


def demo(
    trait: str = "optimistic",
    model: ModelOpt = DEFAULT_MODEL,
    out: Path = Path("runs/demo"),
    seed: Annotated[int, SEED.option("Sampling seed of the extraction answers.")] = 0,
    questions: Annotated[int, DEMO_QUESTIONS.option("Extraction and evaluation questions.")] = 6,
    judge_model: Annotated[str | None, typer.Option(help="A local LLM judge instead of the probe judge (on "
                                                         "the model itself when the package has its probe, else on "
                                                         "the 0.5B).")] = None,
    device: DeviceOpt = None,
    engine: EngineOpt = "auto",
    steer_with: Annotated[str, typer.Option(help="auto: steer with the package's ready-made vector for the model "
                                                 "when it has one (else the fresh one); fresh: the vector just "
                                                 "extracted.")] = "auto",
) -> None:
    """The main job on the embedded model: extract a vector, print its validity, then steer side by side."""
    from personascope.runtime.engines import ENGINES, vllm_available

    from ..demo import run_demo

    choice(engine, ENGINES, "--engine")
    choice(steer_with, ("auto", "fresh"), "--steer-with")
    if engine == "vllm" and not vllm_available():
        fail("--engine vllm needs vLLM; install it with: pip install 'personascope[vllm]'")
    run_demo(trait, model, out, device, judge_model, questions, seed, engine, steer_with)


def register(app: typer.Typer) -> None:
    """Attach `demo`."""
    app.command()(demo)
