"""CLI commands for screen."""

from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    """Add the screen commands to the main app."""
    from .cluster_options import GpusPerWorkerOpt, RayOpt, WorkersOpt, cluster_session, driver_judge, driver_model
    from .common import (
        BATCH,
        COUNT,
        LAYER,
        NEW_TOKENS,
        PERCENT,
        PROJECTION,
        DeviceOpt,
        EngineOpt,
        JudgeModelOpt,
        JudgeModeOpt,
        JudgeUrlOpt,
        ModelOpt,
        start_engines,
    )

    @app.command()
    def screen(
        data: Annotated[Path, typer.Argument(help="Chat JSONL (`messages`, last turn the assistant's) or JSONL/CSV "
                                                  "with prompt/response columns.")],
        vector: Annotated[list[Path], typer.Option("--vector", help="Persona vector file (repeatable: several "
                                                                    "traits in one pass).")],
        model: ModelOpt = DEFAULT_MODEL,
        layer: Annotated[int | None, LAYER.option("Layer to project on (default: each vector's chosen "
                                                  "layer).")] = None,
        method: Annotated[str, typer.Option(help="generate (ΔP against the model's own greedy answer) or "
                                                 "last-token (no generation: the last prompt token's projection "
                                                 "stands in for the model's answer).")] = "generate",
        out: Annotated[Path | None, typer.Option(help="Output directory (default runs/screen-NAME).")] = None,
        threshold: Annotated[float | None, PROJECTION.option("Flag rows with ΔP above this value.")] = None,
        percentile: Annotated[float | None, PERCENT.option("Flag rows above this percentile of ΔP on "
                                                           "--reference (paper: 95).")] = None,
        reference: Annotated[Path | None, typer.Option(help="Clean reference data for --percentile (without "
                                                            "it, the percentile of the data itself).")] = None,
        judge: Annotated[bool, typer.Option("--judge", help="Also judge every response for the trait (flag at "
                                                            "≥ 50) and report both filters side by side.")] = False,
        filter_by: Annotated[str, typer.Option(help="Flags that remove rows from filtered.jsonl: delta_p, judge "
                                                    "or any.")] = "delta_p",
        batch_size: Annotated[int, BATCH.option("Rows per forward / generation batch.")] = 8,
        chunk_size: Annotated[int, COUNT.option("Rows read, processed and saved at a time.")] = 256,
        max_new_tokens: Annotated[int, NEW_TOKENS.option("Length cap of the model's own answers.")] = 128,
        top: Annotated[int, COUNT.option("Rows per trait in top_flagged.md.")] = 20,
        judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
        judge_mode: JudgeModeOpt = None,
        judge_url: JudgeUrlOpt = None,
        device: DeviceOpt = None,
        force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
        ray: RayOpt = None,
        workers: WorkersOpt = None,
        gpus_per_worker: GpusPerWorkerOpt = None,
        engine: EngineOpt = "auto",
    ) -> None:
        """Screen training data: ΔP per sample (projection difference), flags, filtered file and report."""
        from personascope.screen import METHODS, ScreenConfig, screen_dataset

        from ..printing import print_screen_result
        from .common import check_out_dir, console, fail, load_vector_for

        if method not in METHODS:
            fail(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
        if filter_by not in ("delta_p", "judge", "any"):
            fail("--filter-by must be delta_p, judge or any")
        if filter_by != "delta_p" and not judge:
            fail(f"--filter-by {filter_by} needs --judge")
        check_out_dir(out, force)
        if threshold is not None and percentile is not None:
            fail("give --threshold or --percentile, not both")
        for p in [data, *([reference] if reference else [])]:
            if not p.exists():
                fail(f"{p} does not exist")
        with cluster_session(model, device, ray, workers, gpus_per_worker,
                             judge_model if judge and not judge_url else None, judge_mode) as cluster:
            adapter = driver_model(cluster, model, device)
            vectors = {}
            for path in vector:
                pv = load_vector_for(adapter, path)
                name = pv.trait if pv.trait not in vectors else f"{pv.trait}:{path.stem}"
                vectors[name] = pv
            if layer is not None:
                try:
                    adapter.check_layer(layer)
                except ValueError as e:
                    fail(str(e))
            j = driver_judge(cluster, judge_model, judge_mode, device, judge_url) if judge else None
            cfg = ScreenConfig(method=method, batch_size=batch_size, chunk_size=chunk_size,
                               max_new_tokens=max_new_tokens)
            gen = None
            if method == "generate" and cluster is None:
                from personascope.screen import count_rows

                gen = start_engines(engine, adapter, j, count_rows(data), max_new_tokens)
            try:
                result = screen_dataset(adapter, data, vectors, layer=layer, method=method, out_dir=out,
                                        threshold=threshold, percentile=percentile, reference=reference, judge=j,
                                        config=cfg, top=top, filter_by=filter_by, force=force, cluster=cluster,
                                        engine=gen)
            except (ValueError, FileNotFoundError) as e:
                fail(str(e))
        print_screen_result(result)
        console.print(f"report: {(out or Path('runs') / f'screen-{data.stem}') / 'summary.json'}")
