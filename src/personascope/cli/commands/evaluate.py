"""`evaluate` (plain, prompted and steered answers, judged) and `choose-layer` (the best steering layer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL

from ..printing import print_eval_rows
from .cluster_options import GpusPerWorkerOpt, RayOpt, WorkersOpt, cluster_session, driver_judge, driver_model
from .common import (
    ALPHA,
    COEF,
    LAYER,
    QUESTIONS,
    SAMPLES,
    SCORE,
    DeviceOpt,
    EngineOpt,
    JudgeModelOpt,
    JudgeModeOpt,
    JudgeUrlOpt,
    ModelOpt,
    ProfileOpt,
    alpha_to_coef,
    check_judge_mode,
    check_layers,
    check_out_dir,
    choice,
    console,
    fail,
    floats,
    ints,
    load_adapter,
    load_judge,
    load_trait_or_fail,
    load_vector_for,
    start_engines,
)


def evaluate(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
    model: ModelOpt = DEFAULT_MODEL,
    vector: Annotated[Path | None, typer.Option(help="Persona vector file to steer with.")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="Layer(s), e.g. --layer 12,16 (default: the "
                                                        "vector's chosen layer).")] = None,
    coef: Annotated[list[str] | None, typer.Option(help="Raw coefficient(s), e.g. --coef -2,0,2.")] = None,
    alpha: Annotated[list[str] | None, typer.Option(help="Relative coefficient(s): coef·‖v‖/resid_norm.")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt or response.")] = "response",
    guard: Annotated[list[str] | None, typer.Option(help="Also run the persona guard at the vector's calibrated "
                                                         "layer and range: cap and/or conditional (steering with "
                                                         "each --coef/--alpha while above the range; ablation "
                                                         "without one); repeatable.")] = None,
    system: Annotated[list[str] | None, typer.Option(help="'pos', 'neg' (the trait's instruction 0) or any "
                                                          "system text; repeatable.")] = None,
    profile: ProfileOpt = "quick",
    questions: Annotated[int | None, QUESTIONS.option("Use the first N evaluation questions.")] = None,
    samples: Annotated[int | None, SAMPLES.option()] = None,
    capability: Annotated[bool, typer.Option(help="Also report multiple-choice accuracy (120 built-in questions; "
                                                  "for full MMLU use lm-eval with `vector export --format lmeval`, "
                                                  "see docs/interop.md).")] = False,
    capability_file: Annotated[Path | None, typer.Option(help="MMLU-style JSONL (default: built-in).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
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
    """Judge answers to the evaluation questions: plain, prompted and/or steered (sweeps)."""
    from dataclasses import replace

    from personascope.evaluation import EVAL_PROFILES, Condition, sweep_conditions, sweep_rows
    from personascope.steering import POSITIONS
    from personascope.util import plot_sweep

    t = load_trait_or_fail(trait)
    # every option is checked before a model is loaded or anything generated
    choice(profile, EVAL_PROFILES, "--profile")
    choice(positions, POSITIONS, "--positions")
    check_out_dir(out, force)
    check_judge_mode(judge_mode)
    layer_values = ints(layer, "--layer", LAYER)
    coef_values, alpha_values = floats(coef, "--coef", COEF), floats(alpha, "--alpha", ALPHA)
    if (layer_values or coef_values or alpha_values) and vector is None:
        fail("--layer/--coef/--alpha steer with a vector: add --vector FILE")
    guard_modes = [m for g in guard or [] for m in g.split(",") if m]
    if guard_modes and vector is None:
        fail("--guard needs --vector (a vector calibrated with `personascope guard calibrate`)")
    if guard_modes and (ray is not None or workers is not None):
        fail("--guard runs in-process only; drop --ray/--workers")
    from personascope.runtime.engines import ENGINES

    choice(engine, ENGINES, "--engine")
    if engine == "vllm" and (ray is not None or workers is not None):
        fail("--engine vllm runs in-process; drop --ray/--workers")
    if capability and (ray is not None or workers is not None):
        fail("--capability runs on the driver's model; measure it in a run without --ray/--workers")
    with cluster_session(model, device, ray, workers, gpus_per_worker, None if judge_url else judge_model,
                         judge_mode) as cluster:
        adapter = driver_model(cluster, model, device)
        pv = load_vector_for(adapter, vector)
        cfg = EVAL_PROFILES[profile]
        if questions or samples:
            cfg = replace(cfg, n_questions=questions or cfg.n_questions,
                          sampling=replace(cfg.sampling, samples=samples or cfg.sampling.samples))
        conditions = [Condition()]
        layers = layer_values or ([pv.default_layer()] if pv else [])
        if pv is not None:
            check_layers(adapter, layers, "--layer")
            if alpha_values and len(layers) > 1:
                fail("--alpha is converted per layer; give one --layer with --alpha, or use --coef for a sweep")
            coefs = coef_values + [alpha_to_coef(pv, a, layers[0]) for a in alpha_values]
            conditions = sweep_conditions(layers, coefs or [1.0], positions)
            if guard_modes:
                from personascope.evaluation import guard_conditions

                try:
                    conditions += guard_conditions(pv, guard_modes, coefs, positions)
                except ValueError as e:
                    fail(str(e))
        for sys_text in system or []:
            text = t.system_prompt(sys_text, 0) if sys_text in ("pos", "neg") else sys_text
            conditions.append(Condition(system=text, label=f"system:{sys_text}"))
        run_dir = out or Path("runs") / f"eval-{t.name}-{adapter.name.replace('/', '_')}"
        judge = driver_judge(cluster, judge_model, judge_mode, device, judge_url)
        from personascope.evaluation import evaluate as run_eval

        plain = [c for c in conditions if not c.active]
        gen = None if cluster is not None or not plain else start_engines(
            engine, adapter, judge, len(plain) * len(t.eval_questions[: cfg.n_questions or None])
            * cfg.sampling.samples, cfg.sampling.max_new_tokens)
        if gen is not None and len(plain) < len(conditions):
            console.print(f"steered and guarded conditions generate on the HF model ({gen.name} cannot steer them "
                          "exactly)")
        rows = run_eval(adapter, t, judge, conditions, run_dir, vector=pv, cfg=cfg, cluster=cluster, force=force,
                        engine=gen)
        if capability:
            from personascope.evaluation import capability_per_row, load_mc

            for r, acc in zip(rows, capability_per_row(adapter, rows, load_mc(capability_file), pv), strict=True):
                r["capability"] = acc
        print_eval_rows(rows, f"{t.name} on {adapter.name} (judge {judge.name}, {judge.describe_mode('trait', t)})")
        if pv is not None and len([c for c in conditions if c.guard is None]) > 2:
            plot_sweep(sweep_rows(rows, layers), run_dir / "sweep.png", f"{t.name} steering sweep ({adapter.name})")
            console.print(f"sweep plot: {run_dir / 'sweep.png'}")
        from personascope.evaluation import write_summary

        console.print(f"results: {write_summary(rows, run_dir)}")


def choose_layer_cmd(
    trait: str,
    vector: Annotated[Path, typer.Option(help="Persona vector file.")],
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option(help="Candidate layers, e.g. 8,12,16,20 (default: every "
                                                     "fourth layer from L/4).")] = None,
    coef: Annotated[float | None, COEF.option("Raw coefficient for the sweep.")] = None,
    alpha: Annotated[float, ALPHA.option("Relative coefficient used when --coef is not given.")] = 0.5,
    min_coherence: Annotated[float, SCORE.option("Only for rows without fluency flags: a steered layer is eligible "
                                                 "when its mean coherence reaches this or the unsteered mean − "
                                                 "--max-coherence-drop (else ≥ 90 % fluent answers).")] = 50.0,
    max_coherence_drop: Annotated[float, SCORE.option("See --min-coherence.")] = 10.0,
    questions: Annotated[int | None, QUESTIONS.option()] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    judge_mode: JudgeModeOpt = None,
    judge_url: JudgeUrlOpt = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
) -> None:
    """Steer at one coefficient over candidate layers; record the best layer in the vector file."""
    from dataclasses import replace

    from personascope.evaluation import EVAL_PROFILES, Condition, choose_layer, evaluate

    t = load_trait_or_fail(trait)
    given = ints(layers, "--layers", LAYER)
    if layers is not None and not given:
        fail(f"--layers needs at least one layer, got {layers!r}")
    check_judge_mode(judge_mode)
    adapter = load_adapter(model, device)
    pv = load_vector_for(adapter, vector)
    cands = check_layers(adapter, given, "--layers") or list(range(max(1, adapter.n_layers // 4),
                                                                   adapter.n_layers, 4))
    conds = [Condition()]
    for la in cands:
        c = coef if coef is not None else alpha_to_coef(pv, alpha, la)
        conds.append(Condition(la, c, "response"))
    cfg = EVAL_PROFILES["quick"]
    if questions:
        cfg = replace(cfg, n_questions=questions)
    judge = load_judge(judge_model, judge_mode, device, judge_url)
    rows = evaluate(adapter, t, judge, conds, out or Path("runs") / f"choose-layer-{t.name}", vector=pv, cfg=cfg,
                    force=force)
    print_eval_rows(rows, f"choose layer for {t.name}")
    best, detail = choose_layer(rows, min_coherence, max_coherence_drop)
    if best is None:
        fail("no candidate layer kept ≥ 90 % of its answers fluent (judges.fluency); try a smaller --alpha/--coef")
    pv.with_metadata(best_layer=best, layer_choice=json.dumps(detail)).save(vector)
    console.print(f"best layer: [bold]{best}[/] (recorded in {vector})")


def register(app: typer.Typer) -> None:
    """Attach `evaluate` and `choose-layer`."""
    app.command()(evaluate)
    app.command("choose-layer")(choose_layer_cmd)
