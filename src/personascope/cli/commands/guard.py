"""CLI commands of the persona guard: `guard calibrate` (the normal projection range, stored with the vector)."""

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `guard` command group to the main app."""
    from personascope.model import DEFAULT_MODEL

    from .common import BATCH, LAYER, NEW_TOKENS, SAMPLES, DeviceOpt, ModelOpt, Range

    GUARD_PERCENTILE = Range(50, 100, hi_open=True)

    guard_app = typer.Typer(help="Persona guard: cap or conditionally steer the projection when it leaves its "
                                 "normal range.", no_args_is_help=True)
    app.add_typer(guard_app, name="guard")

    @guard_app.command("calibrate")
    def calibrate(
        vector: Annotated[Path, typer.Option(help="Persona vector file.")],
        out: Annotated[Path, typer.Option(help="Where to write the vector with the calibration in its metadata "
                                               "(may be the same file).")],
        model: ModelOpt = DEFAULT_MODEL,
        layer: Annotated[int | None, LAYER.option("Layer (default: the vector's chosen layer).")] = None,
        percentile: Annotated[float, GUARD_PERCENTILE.option("hi = this percentile of the projections, lo = the "
                                                             "mirrored one.")] = 95.0,
        n_questions: Annotated[int, SAMPLES.option("Questions drawn from the shipped question pool.")] = 64,
        distribution: Annotated[str, typer.Option(help="token (every token's projection, what the guard reads) "
                                                       "or response (each answer's mean).")] = "token",
        max_new_tokens: Annotated[int, NEW_TOKENS.option("Longest answer.")] = 64,
        batch_size: Annotated[int, BATCH.option()] = 8,
        device: DeviceOpt = None,
    ) -> None:
        """Measure the projection's normal range on the model's own unprompted answers; store it with the vector."""
        from personascope.steering import DISTRIBUTIONS, calibrate_guard, with_calibration

        from .common import console, fail, load_adapter, load_vector_for

        if distribution not in DISTRIBUTIONS:
            fail(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        if out.is_dir():
            fail(f"--out {out} is a directory; name the vector file to write")
        adapter = load_adapter(model, device)
        pv = load_vector_for(adapter, vector)
        try:
            adapter.check_layer(pv.default_layer(layer))
        except ValueError as e:
            fail(str(e))
        with console.status(f"answering {n_questions} pool questions …"):
            cal = calibrate_guard(adapter, pv, layer, percentile, n_questions, distribution, max_new_tokens,
                                  batch_size)
        with_calibration(pv, cal).save(out)
        console.print(f"layer {cal.layer}: {distribution} projections on v̂, n={cal.n} from {cal.n_questions} "
                      f"answers, mean {cal.mean:+.3f} ± {cal.std:.3f}")
        console.print(f"guard range [{cal.lo:+.3f}, {cal.hi:+.3f}] (percentiles {100 - percentile:g} and "
                      f"{percentile:g}) written to {out}")
