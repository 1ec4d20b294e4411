"""CLI commands for monitoring: `monitor` (the paper's two experiments, with a report) and `watch` (live chat)."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _read_ladder(path: Path) -> list[str]:
    """A JSON list of system prompts (suppressing → eliciting), or an object with a "ladder" list."""
    from .common import fail

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: cannot read the ladder ({e})")
    except RecursionError:
        fail(f"{path}: cannot read the ladder (JSON nested too deeply)")
    if isinstance(data, dict):
        data = data.get("ladder")
    if not isinstance(data, list) or len(data) < 2 or not all(isinstance(s, str) and s.strip() for s in data):
        fail(f"{path}: expected a JSON list of at least 2 system prompts, from suppressing to eliciting")
    return data


def register(app: typer.Typer) -> None:
    """Add the monitor commands to the main app."""
    from personascope.model import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL

    from .common import (
        BATCH,
        COEF,
        LAYER,
        NEW_TOKENS,
        PROJECTION,
        QUESTIONS,
        SAMPLES,
        SEED,
        TEMPERATURE,
        DeviceOpt,
        JudgeModelOpt,
        JudgeModeOpt,
        JudgeUrlOpt,
        ModelOpt,
        ProfileOpt,
        Range,
    )

    SHOT_CHARS = Range(0, 1_000_000)  # 0 keeps each in-context answer whole
    SHOTS = Range(0, 1_000)  # in-context examples per prompt

    @app.command()
    def monitor(
        trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
        vector: Annotated[Path, typer.Option(help="Persona vector file (its run's answers.jsonl gives the "
                                                  "many-shot examples).")],
        model: ModelOpt = DEFAULT_MODEL,
        layer: Annotated[int | None, LAYER.option("Layer (default: the vector's chosen layer).")] = None,
        ladder: Annotated[Path | None, typer.Option(help="JSON list of system prompts, suppressing → eliciting "
                                                         "(default: the built-in ladder).")] = None,
        samples: Annotated[int | None, SAMPLES.option("Samples per prompt and question.")] = None,
        questions: Annotated[int | None, QUESTIONS.option("Use the first N evaluation questions.")] = None,
        shots: Annotated[str | None, typer.Option(help="Shot counts, e.g. 0,5,10,15,20.")] = None,
        shots_from: Annotated[Path | None, typer.Option(help="answers.jsonl with pos answers for the "
                                                             "in-context examples.")] = None,
        shot_chars: Annotated[int | None, SHOT_CHARS.option("Truncate each in-context answer to N characters "
                                                            "(0: keep whole).")] = None,
        experiments: Annotated[str, typer.Option(help="system, shots or both.")] = "system,shots",
        max_new_tokens: Annotated[int | None, NEW_TOKENS.option()] = None,
        temperature: Annotated[float | None, TEMPERATURE.option()] = None,
        batch_size: Annotated[int | None, BATCH.option()] = None,
        seed: Annotated[int | None, SEED.option()] = None,
        profile: ProfileOpt = "quick",
        out: Annotated[Path | None, typer.Option(help="Output directory (default runs/monitor-TRAIT-MODEL).")]
        = None,
        screenshot: Annotated[bool, typer.Option(help="Save heatmap.png with headless Chromium if present.")]
        = True,
        judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
        judge_mode: JudgeModeOpt = None,
        judge_url: JudgeUrlOpt = None,
        device: DeviceOpt = None,
        force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    ) -> None:
        """Does the last prompt token's projection predict the trait? System-prompt ladder and many-shot, with r."""
        from dataclasses import replace

        from personascope.monitor import MONITOR_PROFILES, load_shot_pool, run_monitor
        from personascope.traits import TraitError

        from ..printing import print_monitor_result
        from .common import (
            check_out_dir,
            fail,
            ints,
            load_adapter,
            load_judge,
            load_trait_or_fail,
            load_vector_for,
        )

        if profile not in MONITOR_PROFILES:
            fail(f"unknown profile {profile!r}; choose from {', '.join(MONITOR_PROFILES)}")
        t = load_trait_or_fail(trait)
        check_out_dir(out, force)
        exps = tuple(x.strip() for x in experiments.split(",") if x.strip())
        if not exps or set(exps) - {"system", "shots"}:
            fail(f"--experiments takes system, shots or both, got {experiments!r}")
        cfg = MONITOR_PROFILES[profile]
        over: dict[str, Any] = {"samples": samples, "n_questions": questions, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "batch_size": batch_size, "seed": seed,
                "shots": tuple(ints(shots, "--shots", SHOTS)) if shots else None}
        cfg = replace(cfg, experiments=exps, **{k: v for k, v in over.items() if v is not None})
        if shot_chars is not None:
            cfg = replace(cfg, shot_chars=shot_chars or None)
        lad = _read_ladder(ladder) if ladder else None
        if lad is None and "system" in exps:
            from personascope.traits import load_ladder

            try:
                lad = load_ladder(t.name)
            except TraitError as e:
                fail(str(e))
        pool = None
        if shots_from is not None:
            try:
                pool = load_shot_pool(shots_from, shots_from.parent / "scores.jsonl", t.eval_questions)
            except FileNotFoundError as e:
                fail(str(e))
        adapter = load_adapter(model, device)
        pv = load_vector_for(adapter, vector)
        try:
            adapter.check_layer(pv.default_layer(layer))
        except ValueError as e:
            fail(str(e))
        judge = load_judge(judge_model, judge_mode, device, judge_url)
        run_dir = out or Path("runs") / f"monitor-{t.name}-{adapter.name.replace('/', '_')}"
        try:
            result = run_monitor(adapter, t, judge, pv, run_dir, cfg, layer=layer, ladder=lad, shot_pool=pool,
                                 screenshot=screenshot, force=force)
        except ValueError as e:
            fail(str(e))
        print_monitor_result(result)

    @app.command()
    def watch(
        vector: Annotated[Path, typer.Option(help="Persona vector file.")],
        model: ModelOpt = DEFAULT_MODEL,
        layer: Annotated[int | None, LAYER.option("Layer (default: the vector's chosen layer).")] = None,
        threshold: Annotated[float | None, PROJECTION.option("Mark turns whose prompt or any answer token "
                                                             "projects at or above this value.")] = None,
        system: Annotated[str | None, typer.Option(help="System prompt for the chat.")] = None,
        max_new_tokens: Annotated[int, NEW_TOKENS.option()] = 128,
        temperature: Annotated[float, TEMPERATURE.option("0 = greedy.")] = 0.7,
        history: Annotated[bool, typer.Option(help="Keep earlier turns in the prompt.")] = True,
        save_html: Annotated[Path | None, typer.Option(help="Write the session's heat map to this HTML file.")]
        = None,
        guard: Annotated[str | None, typer.Option(help="Answer under the persona guard (the vector's calibrated "
                                                       "range): cap or conditional.")] = None,
        guard_coef: Annotated[float | None, COEF.option("Conditional guard: the raw coefficient added "
                                                        "while above the range (default: ablate v̂).")] = None,
        device: DeviceOpt = None,
    ) -> None:
        """Chat in the terminal with a live trait meter before each answer and a coloured per-token trace."""
        import sys

        from ..watch import read_lines, run_watch
        from .common import console, fail, load_adapter, load_vector_for

        adapter = load_adapter(model, device)
        pv = load_vector_for(adapter, vector)
        la = pv.default_layer(layer)
        try:
            adapter.check_layer(la)
        except ValueError as e:
            fail(str(e))
        g = None
        if guard is not None or guard_coef is not None:
            from personascope.steering import guard_for

            try:
                g = guard_for(adapter, pv, guard or "conditional", layer=la, coef=guard_coef)
            except ValueError as e:
                fail(str(e))
        run_watch(adapter, pv, la, read_lines(sys.stdin, console), console, threshold=threshold, system=system,
                  max_new_tokens=max_new_tokens, temperature=temperature, history=history, html_path=save_html,
                  guard=g)
