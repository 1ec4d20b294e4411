"""`extract`: a persona vector from a trait (generate, judge, filter, extract; resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL

from ..printing import print_extraction
from .cluster_options import GpusPerWorkerOpt, RayOpt, WorkersOpt, cluster_session, driver_judge, driver_model
from .common import (
    BATCH,
    NEW_TOKENS,
    QUESTIONS,
    SAMPLES,
    SCORE,
    SEED,
    TEMPERATURE,
    TOP_P,
    DeviceOpt,
    EngineOpt,
    JudgeModelOpt,
    JudgeModeOpt,
    JudgeUrlOpt,
    ModelOpt,
    ProfileOpt,
    check_judge_mode,
    check_out_dir,
    choice,
    fail,
    load_trait_or_fail,
    start_engines,
)


def extract(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = "quick",
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/TRAIT-MODEL-PROFILE).")] = None,
    samples: Annotated[int | None, SAMPLES.option("Samples per prompt.")] = None,
    questions: Annotated[int | None, QUESTIONS.option("Use the first N extraction questions.")] = None,
    max_new_tokens: Annotated[int | None, NEW_TOKENS.option()] = None,
    temperature: Annotated[float | None, TEMPERATURE.option()] = None,
    top_p: Annotated[float | None, TOP_P.option()] = None,
    batch_size: Annotated[int | None, BATCH.option()] = None,
    seed: Annotated[int | None, SEED.option()] = None,
    pos_threshold: Annotated[float | None, SCORE.option()] = None,
    neg_threshold: Annotated[float | None, SCORE.option()] = None,
    coherence_threshold: Annotated[float | None, SCORE.option()] = None,
    filter: Annotated[str | None, typer.Option(help="Which pairs build the vector: threshold (the paper's pos ≥ "
                                               "50, neg < 50, coherence ≥ 50), margin (pos − neg ≥ --margin) "
                                               "or none (every pair but refusals).")] = None,
    margin: Annotated[float | None, SCORE.option("Trait-score margin for --filter margin.")] = None,
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
    """Extract a persona vector: generate, judge, filter, extract (resumable)."""
    from personascope.runtime.engines import ENGINES, vllm_available
    from personascope.vectors import answer_jobs, extract_vector
    from personascope.vectors import profile as make_profile

    t = load_trait_or_fail(trait)
    check_out_dir(out, force)
    check_judge_mode(judge_mode)
    choice(engine, ENGINES, "--engine")
    if engine == "vllm" and (ray is not None or workers is not None):
        fail("--engine vllm runs in-process; drop --ray/--workers")
    if engine == "vllm" and not vllm_available():
        fail("--engine vllm needs vLLM; install it with: pip install 'personascope[vllm]'")
    cfg = make_profile(profile, samples=samples, n_questions=questions, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                       pos_threshold=pos_threshold, neg_threshold=neg_threshold,
                       coherence_threshold=coherence_threshold, filter=filter, margin=margin)
    with cluster_session(model, device, ray, workers, gpus_per_worker, None if judge_url else judge_model,
                         judge_mode) as cluster:
        adapter = driver_model(cluster, model, device)
        judge = driver_judge(cluster, judge_model, judge_mode, device, judge_url)
        try:
            gen_engine = None if cluster is not None else start_engines(
                engine, adapter, judge, len(answer_jobs(t, cfg)), cfg.sampling.max_new_tokens)
            pv = extract_vector(adapter, t, judge=judge, config=cfg, run_dir=out, force=force, cluster=cluster,
                                engine=gen_engine)
            print_extraction(Path(str(pv.path)).parent)
        except ValueError as e:
            fail(str(e))


def register(app: typer.Typer) -> None:
    """Attach `extract`."""
    app.command()(extract)
