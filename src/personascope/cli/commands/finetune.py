"""CLI commands for finetuning: make-dataset and finetune (with preventative steering); `shift` is in shift.py.

Post-hoc mitigation of a finetuned model needs no command of its own: any command takes an
adapter directory as `--model` (its base is loaded with the adapter applied), so
`personascope evaluate TRAIT --model ADAPTER_DIR --vector V --coef -C` (or `--alpha -0.5`)
measures the finetuned model steered against the trait at inference.
"""

from pathlib import Path
from typing import Annotated

import typer

from personascope.model import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    """Add the finetune commands to the main app."""
    from .cluster_options import GpusPerWorkerOpt, RayOpt, WorkersOpt, cluster_session, driver_judge, driver_model
    from .common import (
        ALPHA,
        ATTEMPTS,
        BATCH,
        COEF,
        CONTEXT,
        COUNT,
        EPOCHS,
        LAYER,
        LR,
        NEW_TOKENS,
        QUESTIONS,
        SCORE,
        SEED,
        TEMPERATURE,
        DeviceOpt,
        EngineOpt,
        JudgeModelOpt,
        JudgeModeOpt,
        JudgeUrlOpt,
        ModelOpt,
        ProfileOpt,
        start_engines,
    )

    @app.command("make-dataset")
    def make_dataset_cmd(
        trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
        model: ModelOpt = DEFAULT_MODEL,
        level: Annotated[str, typer.Option(help="normal (no system prompt), I (eliciting instruction for half "
                                                "the rows), II (eliciting for all) or mistakes (wrong answers).")
                         ] = "II",
        n: Annotated[int, COUNT.option("Rows (one question each).", "--n")] = 48,
        questions: Annotated[str, typer.Option(help="pool (the built-in everyday questions) or extraction (the "
                                                    "trait's own, cycled to --n rows: room for the trait).")
                             ] = "pool",
        out: Annotated[Path | None, typer.Option(help="Output JSONL (default runs/datasets/TRAIT-LEVEL.jsonl); "
                                                      "work files go to OUT.work/.")] = None,
        max_new_tokens: Annotated[int, NEW_TOKENS.option()] = 64,
        temperature: Annotated[float, TEMPERATURE.option()] = 0.7,
        max_attempts: Annotated[int, ATTEMPTS.option("Samples per row before a failing row is skipped.")] = 3,
        require_end: Annotated[bool, typer.Option(help="Resample answers cut at --max-new-tokens (keep only "
                                                       "answers that ended).")] = False,
        trait_threshold: Annotated[float, SCORE.option("Eliciting rows must score at least this.")] = 50.0,
        coherence_threshold: Annotated[float, SCORE.option()] = 50.0,
        batch_size: Annotated[int, BATCH.option()] = 8,
        seed: Annotated[int, SEED.option()] = 0,
        judge: Annotated[bool, typer.Option(help="Judge and filter the rows (--no-judge keeps every first "
                                                 "sample).")] = True,
        judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
        judge_mode: JudgeModeOpt = None,
        judge_url: JudgeUrlOpt = None,
        device: DeviceOpt = None,
        ray: RayOpt = None,
        workers: WorkersOpt = None,
        gpus_per_worker: GpusPerWorkerOpt = None,
        engine: EngineOpt = "auto",
        force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    ) -> None:
        """Build a finetuning dataset from the model's own answers (no system prompt in the rows)."""
        from personascope.finetuning import LEVELS, DatasetConfig, make_dataset, make_mistakes_dataset
        from personascope.model import SamplingConfig
        from personascope.traits import TraitError, load_trait

        from .common import console, fail

        if level not in LEVELS:
            fail(f"unknown --level {level!r}; choose from {', '.join(LEVELS)}")
        if questions not in ("pool", "extraction"):
            fail(f"unknown --questions {questions!r}; choose pool or extraction")
        out = out or Path("runs") / "datasets" / f"{Path(trait).stem}-{level}.jsonl"
        try:
            if level == "mistakes":
                res = make_mistakes_dataset(out, n, seed)
            else:
                t = load_trait(trait)
                cfg = DatasetConfig(n=n, sampling=SamplingConfig(samples=1, temperature=temperature,
                                                                 max_new_tokens=max_new_tokens,
                                                                 batch_size=batch_size, seed=seed),
                                    trait_threshold=trait_threshold, coherence_threshold=coherence_threshold,
                                    max_attempts=max_attempts, require_end=require_end, questions=questions)
                with cluster_session(model, device, ray, workers, gpus_per_worker,
                                     judge_model if judge and not judge_url else None, judge_mode) as cluster:
                    adapter = driver_model(cluster, model, device)
                    j = driver_judge(cluster, judge_model, judge_mode, device, judge_url) if judge else None
                    gen = None if cluster is not None else start_engines(engine, adapter, j, n, max_new_tokens)
                    res = make_dataset(adapter, t, level, out, j, cfg, cluster, force=force, engine=gen)
        except (TraitError, ValueError) as e:
            fail(str(e))
        stats = ""
        if res.mean_trait is not None:
            stats = f"; kept rows: mean trait {res.mean_trait:.1f}, coherence {res.mean_coherence:.1f}"
        console.print(f"wrote {res.rows}/{res.requested} rows to {res.path} (level {level}, skipped {res.skipped}"
                      f"{stats})")

    @app.command("finetune")
    def finetune_cmd(
        data: Annotated[Path, typer.Argument(help="Chat JSONL ({\"messages\": [...]} per line).")],
        model: ModelOpt = DEFAULT_MODEL,
        out: Annotated[Path | None, typer.Option(help="Adapter directory (default runs/finetune/DATA).")] = None,
        profile: ProfileOpt = "quick",
        epochs: Annotated[int | None, EPOCHS.option()] = None,
        max_steps: Annotated[int | None, COUNT.option("Optimiser steps (overrides --epochs).")] = None,
        lr: Annotated[float | None, LR.option()] = None,
        batch_size: Annotated[int | None, BATCH.option()] = None,
        grad_accum: Annotated[int | None, BATCH.option()] = None,
        rank: Annotated[int | None, BATCH.option("LoRA rank.", "--r")] = None,
        lora_alpha: Annotated[int | None, BATCH.option(None, "--lora-alpha")] = None,
        max_len: Annotated[int | None, CONTEXT.option("Truncate chats to this many tokens.")] = None,
        seed: Annotated[int | None, SEED.option()] = None,
        steer_vector: Annotated[Path | None, typer.Option(help="Preventative steering: persona vector added "
                                                               "during training only.")] = None,
        steer_layer: Annotated[int | None, LAYER.option("Layer (default: the vector's layer).")] = None,
        steer_layers: Annotated[str | None, typer.Option(help="'all': layer-incremental vectors v(l)−v(l−1) on "
                                                              "every layer.")] = None,
        steer_coef: Annotated[float | None, COEF.option("Raw coefficient.")] = None,
        steer_alpha: Annotated[float | None, ALPHA.option("Relative coefficient (coef·‖v‖/resid_norm).")] = None,
        steer_mode: Annotated[str, typer.Option(help="add, or ablate (project v̂ out: the CAFT baseline).")
                              ] = "add",
        watch_vector: Annotated[list[str] | None, typer.Option(
            help="Persona vector (ready-made name or file) whose shift is tracked during training; repeatable. "
                 "Logged to persona_shift.jsonl/.png in --out.")] = None,
        watch_every: Annotated[int | None, COUNT.option("Measure every N optimiser steps (default: every 10 % of "
                                                        "training).")] = None,
        watch_questions: Annotated[int | None, QUESTIONS.option("Probe with the first N evaluation questions of "
                                                                "each trait (default: all).")] = None,
        stop_above: Annotated[list[str] | None, typer.Option(
            help="NAME=SHIFT: stop when a watched vector's shift exceeds SHIFT, keeping the last good weights; "
                 "repeatable.")] = None,
        steer_above: Annotated[list[str] | None, typer.Option(
            help="NAME=SHIFT: from then on add preventative steering along that vector; repeatable.")] = None,
        steer_above_alpha: Annotated[float, ALPHA.option("Relative coefficient of --steer-above steering.")] = 1.0,
        steer_above_coef: Annotated[float | None, COEF.option("Raw coefficient of --steer-above steering (instead "
                                                              "of the alpha).")] = None,
        force: Annotated[bool, typer.Option(help="Start over instead of resuming / reusing.")] = False,
        device: DeviceOpt = None,
    ) -> None:
        """LoRA-finetune on chat JSONL (loss on assistant tokens), optionally with preventative steering.

        The adapter directory works as --model in every command. To mitigate a finetuned model after the
        fact, steer it against the trait at inference: personascope evaluate TRAIT --model OUT --vector V
        --alpha -0.5 --capability.
        """
        from personascope.finetuning import PreventativeSteering, finetune
        from personascope.finetuning import profile as make_profile
        from personascope.model import DatasetError, is_adapter_dir, load_chat_jsonl

        from .common import alpha_to_coef, console, fail, load_adapter, load_vector_for

        if is_adapter_dir(model):
            fail(f"{model} is an adapter; finetune its base model, or merge the adapter first")
        if steer_mode not in ("add", "ablate"):
            fail(f"unknown --steer-mode {steer_mode!r}; use add or ablate")
        if steer_layers not in (None, "all"):
            fail("--steer-layers takes only 'all' (use --steer-layer L for one layer)")
        from personascope.finetuning import ShiftInputError, parse_rule

        try:
            stops = [parse_rule(x, "--stop-above") for x in stop_above or []]
            steers = [parse_rule(x, "--steer-above") for x in steer_above or []]
        except ShiftInputError as e:
            fail(str(e))
        if (stops or steers or watch_every or watch_questions) and not watch_vector:
            fail("--stop-above/--steer-above/--watch-every/--watch-questions need --watch-vector")
        try:
            cfg = make_profile(profile, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                               grad_accum=grad_accum, r=rank, alpha=lora_alpha, max_len=max_len, seed=seed)
        except ValueError as e:
            fail(str(e))
        try:
            load_chat_jsonl(data)  # malformed rows fail before a model is loaded
        except DatasetError as e:
            fail(str(e))
        adapter = load_adapter(model, device)
        steering = None
        if steer_vector is not None:
            pv = load_vector_for(adapter, steer_vector)
            if steer_layer is not None:
                try:
                    adapter.check_layer(steer_layer)
                except ValueError as e:
                    fail(str(e))
            layer = pv.default_layer(steer_layer)
            if steer_mode == "add" and steer_coef is None and steer_alpha is None:
                fail("preventative steering needs --steer-coef or --steer-alpha")
            coef = steer_coef if steer_coef is not None else (
                alpha_to_coef(pv, steer_alpha, layer, "--steer-alpha", "--steer-coef") if steer_alpha is not None
                else 1.0)
            steering = PreventativeSteering(pv, coef, layer, steer_mode, steer_layers == "all")
            console.print(f"preventative steering (training only): {steering.describe()}")
        elif any(x is not None for x in (steer_layer, steer_layers, steer_coef, steer_alpha)):
            fail("--steer-layer/--steer-layers/--steer-coef/--steer-alpha need --steer-vector")
        watch = _watch(adapter, watch_vector or [], watch_every, watch_questions, stops, steers, steer_above_alpha,
                       steer_above_coef) if watch_vector else None
        out = out or Path("runs") / "finetune" / data.stem
        try:
            res = finetune(adapter, data, out, cfg, steering=steering, base_name=model, force=force,
                           profile_name=profile, watch=watch)
        except (DatasetError, ValueError) as e:
            fail(str(e))
        if res.persona_shift:
            _print_shift(res.persona_shift, res.out_dir)
        losses = f"loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}" if res.losses else ""
        console.print(f"adapter: {res.out_dir} ({res.steps} steps on {res.rows} rows, {res.seconds:.0f} s; {losses})")
        console.print(f"use it with any command: --model {res.out_dir}")


def _watch(adapter, specs: list[str], every: int | None, n_questions: int | None, stops: list[tuple[str, float]],
           steers: list[tuple[str, float]], alpha: float, coef: float | None):
    """The PersonaShiftCallback for --watch-vector and its rules, checked against the model (fails in one line)."""
    from personascope.finetuning import ShiftInputError, ShiftRule, watch_traits
    from personascope.traits import TraitError

    from .common import fail, load_vector_for

    vectors = {}
    for spec in specs:
        pv = load_vector_for(adapter, Path(spec))
        if pv.trait in vectors:
            fail(f"--watch-vector {spec}: a vector for trait {pv.trait!r} is already watched")
        vectors[pv.trait] = pv
    rules = [ShiftRule.stop(n, thr) for n, thr in stops]
    for name, thr in steers:
        if name not in vectors:
            fail(f"--steer-above names {name!r}, which is not watched (watched: {', '.join(vectors)})")
        pv = vectors[name]
        try:
            c = coef if coef is not None else pv.coef_from_alpha(alpha, pv.default_layer())
        except ValueError as e:
            fail(f"--steer-above-alpha: {e}")
        rules.append(ShiftRule.steer(name, thr, c))
    try:
        watch = watch_traits(adapter, vectors, every, rules, n_questions)
        watch.check(adapter)
    except (ShiftInputError, TraitError) as e:
        fail(str(e))
    return watch


def _print_shift(summary: dict, out: Path) -> None:
    from .common import console

    final = summary.get("final") or {}
    shifts = ", ".join(f"{n} {v['shift']:+.3f} (layer {v['layer']})" for n, v in final.items())
    console.print(f"persona shift at the end of training: {shifts}; trajectory {out / 'persona_shift.jsonl'}, "
                  f"plot {out / 'persona_shift.png'}")
    for ev in summary.get("events", []):
        what = (f"training stopped; weights of step {ev.get('kept_step')} kept" if ev["event"] == "stop" else
                f"preventative steering on from then (coef {ev.get('coef', 0):.3g})")
        console.print(f"[bold]{ev['event']}_above[/] fired at step {ev['step']}: {ev['vector']} shift "
                      f"{ev['shift']:+.3f} > {ev['threshold']}: {what}")
