"""The shared `--ray ADDRESS` / `--workers N` / `--gpus-per-worker G` options and the cluster they open."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from .common import GPUS, WORKERS

RayOpt = Annotated[str | None, typer.Option(
    "--ray", metavar="ADDRESS", help="Run the per-row work on Ray model actors: 'auto' joins the cluster this "
                                     "machine belongs to (after `ray start`), ray://HOST:10001 a remote one, "
                                     "'local' starts a local Ray instance.")]
WorkersOpt = Annotated[int | None, WORKERS.option(
    "Model actors (default with --ray: one per GPU group); without --ray, starts a local Ray instance with N "
    "workers.", "--workers")]
GpusPerWorkerOpt = Annotated[float | None, GPUS.option(
    "GPUs per actor; above 1 the model is sharded over them (device_map=auto).", "--gpus-per-worker")]


@contextmanager
def cluster_session(model: str, device: str | None, ray: str | None, workers: int | None,
                    gpus_per_worker: float | None, judge_model: str | None = None, judge_mode: str | None = None
                    ) -> Iterator[object | None]:
    """A started RayCluster for the options (None when neither --ray nor --workers is given); closed after."""
    if ray is None and workers is None:
        yield None
        return
    from rich.console import Console

    from personascope.runtime.cluster import JudgeSpec, ModelSpec, RayCluster

    if workers is not None and workers < 1:
        raise typer.BadParameter(f"--workers must be at least 1, not {workers}")
    address = None if ray in (None, "", "local") else ray
    spec = ModelSpec(model, device, device_map="auto" if gpus_per_worker and gpus_per_worker > 1 else None)
    judge = JudgeSpec(judge_model, judge_mode, device) if judge_model else None
    cluster = RayCluster(spec, workers, address, judge=judge, gpus_per_worker=gpus_per_worker)
    with Console(stderr=True).status(f"starting Ray workers with {model} …"):
        try:
            cluster.start()
        except (RuntimeError, ConnectionError, ValueError) as e:
            Console(stderr=True).print(f"[red]error:[/] --ray {ray or 'local'}: {e}")
            raise typer.Exit(2) from None
    try:
        yield cluster
    finally:
        cluster.close()


def driver_model(cluster, model: str, device: str | None):
    """The driver's adapter: weightless with a cluster (the actors hold the model), else loaded here."""
    if cluster is None:
        from .common import load_adapter

        return load_adapter(model, device)
    return cluster.driver_adapter()


def driver_judge(cluster, judge_model: str, judge_mode: str | None, device: str | None, judge_url: str | None):
    """An API judge, a weightless stand-in for the actors' local judge, or the local judge loaded here."""
    if cluster is not None and judge_url is None:
        return cluster.judge.stand_in()
    from .common import load_judge

    return load_judge(judge_model, judge_mode, device, judge_url)
