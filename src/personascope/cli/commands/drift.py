"""CLI command `drift`: every conversation's trajectory along persona vectors, flags and an HTML report."""

from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_MODEL


def drift_vector(adapter, name: str, pv, layer: int | None, calibrate_n: int, batch_size: int = 8):
    """(DriftVector, GuardCalibration | None) for a loaded vector: the normal range from the stored guard
    calibration, measured now on `calibrate_n` pool questions when the file has none at that layer (none at all
    with calibrate_n 0)."""
    from personascope.monitor import DriftVector, Normal
    from personascope.steering import GuardCalibration, calibrate_guard

    layer = pv.default_layer(layer)
    adapter.check_layer(layer)
    cal = GuardCalibration.from_vector(pv)
    if (cal is None or cal.layer != layer or cal.normal("prompt") is None) and calibrate_n > 0:
        cal = calibrate_guard(adapter, pv, layer, n_questions=calibrate_n, batch_size=batch_size)
    if cal is None or cal.layer != layer:
        return DriftVector(name, pv, layer), None
    if cal.normal("prompt") is None or cal.normal("response") is None:
        return DriftVector(name, pv, layer), cal
    (pm, ps), (rm, rs) = cal.normal("prompt"), cal.normal("response")  # type: ignore[misc]
    return DriftVector(name, pv, layer, Normal(pm, ps, rm, rs)), cal


def register(app: typer.Typer) -> None:
    """Add the drift command to the main app."""
    from .common import BATCH, COUNT, LAYER, DeviceOpt, ModelOpt, Range

    Z_SCORE = Range(-100, 100)  # a threshold on z (negative: flag a drop below the normal range's mean too)
    RISE = Range(0, 100, lo_open=True)
    POOL = Range(0, 100_000)  # 0: no calibration, raw projections

    @app.command()
    def drift(
        data: Annotated[Path, typer.Argument(help="JSONL: one conversation per line, {\"messages\": [...], "
                                                  "\"id\": optional}.")],
        vector: Annotated[list[str], typer.Option("--vector", help="Ready-made vector NAME or FILE "
                                                                   "(repeatable).")],
        model: ModelOpt = DEFAULT_MODEL,
        layer: Annotated[int | None, LAYER.option("Layer for every vector (default: each vector's own).")
                         ] = None,
        out: Annotated[Path | None, typer.Option(help="Output folder (default runs/drift-NAME).")] = None,
        z: Annotated[float, Z_SCORE.option("Flag when the z-score is at least this ...", "--z")] = 2.0,
        turns: Annotated[int, COUNT.option("... on this many consecutive assistant turns.")] = 2,
        rise: Annotated[float | None, RISE.option("Also flag a rise of the z-score by this much since the "
                                                     "first turn.")] = None,
        span: Annotated[str, typer.Option(help="pre (the last token before the turn, the paper's predictor) or "
                                               "response (the turn's mean).")] = "pre",
        calibrate: Annotated[int, POOL.option("Pool questions to measure a vector's normal range on when "
                                              "its file has none (`guard calibrate`); 0: raw projections.")
                             ] = 32,
        batch_size: Annotated[int, BATCH.option("Conversations per forward.")] = 4,
        max_plots: Annotated[int, COUNT.option("Flagged conversations drawn in report.html.")] = 50,
        device: DeviceOpt = None,
        force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    ) -> None:
        """Trajectories of a file of conversations along persona vectors; flags drifting ones; HTML report."""
        from personascope.monitor import DriftRule, run_drift

        from .common import console, fail, load_adapter, load_vector_for

        if not data.exists():
            fail(f"{data} does not exist")
        if turns < 1:
            fail(f"--turns must be at least 1, got {turns}")
        if span not in ("pre", "response"):
            fail(f"--span must be pre or response, got {span!r}")
        if batch_size < 1:
            fail(f"--batch-size must be at least 1, got {batch_size}")
        adapter = load_adapter(model, device)
        dvs: list = []
        for spec in vector:
            pv = load_vector_for(adapter, Path(spec))
            name = pv.trait if pv.trait not in [d.name for d in dvs] else f"{pv.trait}:{Path(spec).stem}"
            try:
                with console.status(f"normal range of {name} …"):
                    dvs.append(drift_vector(adapter, name, pv, layer, calibrate)[0])
            except ValueError as e:
                fail(f"--vector {spec}: {e}")
        rule = DriftRule(z, turns, rise, span)
        folder = out or Path("runs") / f"drift-{data.stem}"
        settings = {"rule": rule.describe(), "calibrate": calibrate}
        try:
            with console.status("tracking conversations …"):
                res = run_drift(adapter, data, dvs, rule, folder, batch_size, force, max_plots, settings)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        for bad in res.errors:
            console.print(f"[yellow]skipped[/] {data}:{bad['line']}: {bad['error']}", markup=True, highlight=False)
        console.print(f"{res.conversations} conversations, {res.turns} turns in {res.seconds:.1f} s; rule: "
                      f"{rule.describe()}")
        for name, ids in res.flagged.items():
            console.print(f"  {name}: {len(ids)} flagged")
        console.print(f"report: {res.files['report']}")
