"""CLI commands for finetuning: make-dataset, finetune (with preventative steering) and shift.

Post-hoc mitigation of a finetuned model needs no command of its own: any command takes an
adapter directory as `--model` (its base is loaded with the adapter applied), so
`personascope evaluate TRAIT --model ADAPTER_DIR --vector V --coef -C` (or `--alpha -0.5`)
measures the finetuned model steered against the trait at inference.
"""

from pathlib import Path
from typing import Annotated

import typer

from ..models import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    """Add the finetune commands to the main app."""
    from personascope.commands.common import (
        DeviceOpt,
        JudgeModelOpt,
        JudgeModeOpt,
        JudgeUrlOpt,
        ModelOpt,
        ProfileOpt,
        finite_number,
    )

    @app.command("make-dataset")
    def make_dataset_cmd(
        trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
        model: ModelOpt = DEFAULT_MODEL,
        level: Annotated[str, typer.Option(help="normal (suppressing instruction), I (eliciting for half the "
                                                "rows), II (eliciting for all) or mistakes (wrong answers).")
                         ] = "II",
        n: Annotated[int, typer.Option("--n", help="Rows (questions from the built-in pool).")] = 48,
        out: Annotated[Path | None, typer.Option(help="Output JSONL (default runs/datasets/TRAIT-LEVEL.jsonl); "
                                                      "work files go to OUT.work/.")] = None,
        max_new_tokens: Annotated[int, typer.Option()] = 64,
        temperature: Annotated[float, typer.Option()] = 0.7,
        max_attempts: Annotated[int, typer.Option(help="Samples per row before a failing row is skipped.")] = 3,
        trait_threshold: Annotated[float, typer.Option(help="Eliciting rows must score at least this.")] = 50.0,
        coherence_threshold: Annotated[float, typer.Option()] = 50.0,
        batch_size: Annotated[int, typer.Option()] = 8,
        seed: Annotated[int, typer.Option()] = 0,
        judge: Annotated[bool, typer.Option(help="Judge and filter the rows (--no-judge keeps every first "
                                                 "sample).")] = True,
        judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
        judge_mode: JudgeModeOpt = None,
        judge_url: JudgeUrlOpt = None,
        device: DeviceOpt = None,
        force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    ) -> None:
        """Build a finetuning dataset from the model's own answers (no system prompt in the rows)."""
        from personascope.commands.common import console, fail, load_adapter, load_judge

        from ..datasets import LEVELS, DatasetConfig, make_dataset, make_mistakes_dataset
        from ..generate import SamplingConfig
        from ..traits import TraitError, load_trait

        if level not in LEVELS:
            fail(f"unknown --level {level!r}; choose from {', '.join(LEVELS)}")
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
                                    max_attempts=max_attempts)
                adapter = load_adapter(model, device)
                j = load_judge(judge_model, judge_mode, device, judge_url) if judge else None
                res = make_dataset(adapter, t, level, out, j, cfg, force=force)
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
        epochs: Annotated[int | None, typer.Option()] = None,
        max_steps: Annotated[int | None, typer.Option(help="Optimiser steps (overrides --epochs).")] = None,
        lr: Annotated[float | None, typer.Option()] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        grad_accum: Annotated[int | None, typer.Option()] = None,
        rank: Annotated[int | None, typer.Option("--r", help="LoRA rank.")] = None,
        lora_alpha: Annotated[int | None, typer.Option("--lora-alpha")] = None,
        max_len: Annotated[int | None, typer.Option(help="Truncate chats to this many tokens.")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        steer_vector: Annotated[Path | None, typer.Option(help="Preventative steering: persona vector added "
                                                               "during training only.")] = None,
        steer_layer: Annotated[int | None, typer.Option(help="Layer (default: the vector's layer).")] = None,
        steer_layers: Annotated[str | None, typer.Option(help="'all': layer-incremental vectors v(l)−v(l−1) on "
                                                              "every layer.")] = None,
        steer_coef: Annotated[float | None, typer.Option(help="Raw coefficient.", callback=finite_number)] = None,
        steer_alpha: Annotated[float | None, typer.Option(help="Relative coefficient (coef·‖v‖/resid_norm).",
                                                          callback=finite_number)
                               ] = None,
        steer_mode: Annotated[str, typer.Option(help="add, or ablate (project v̂ out: the CAFT baseline).")
                              ] = "add",
        force: Annotated[bool, typer.Option(help="Start over instead of resuming / reusing.")] = False,
        device: DeviceOpt = None,
    ) -> None:
        """LoRA-finetune on chat JSONL (loss on assistant tokens), optionally with preventative steering.

        The adapter directory works as --model in every command. To mitigate a finetuned model after the
        fact, steer it against the trait at inference: personascope evaluate TRAIT --model OUT --vector V
        --alpha -0.5 --capability.
        """
        from personascope.commands.common import console, fail, load_adapter, load_vector_for

        from ..chat import DatasetError, load_chat_jsonl
        from ..finetune import PreventativeSteering, finetune, is_adapter_dir
        from ..finetune import profile as make_profile

        if is_adapter_dir(model):
            fail(f"{model} is an adapter; finetune its base model, or merge the adapter first")
        if steer_mode not in ("add", "ablate"):
            fail(f"unknown --steer-mode {steer_mode!r}; use add or ablate")
        if steer_layers not in (None, "all"):
            fail("--steer-layers takes only 'all' (use --steer-layer L for one layer)")
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
                pv.coef_from_alpha(steer_alpha, layer) if steer_alpha is not None else 1.0)
            steering = PreventativeSteering(pv, coef, layer, steer_mode, steer_layers == "all")
            console.print(f"preventative steering (training only): {steering.describe()}")
        elif any(x is not None for x in (steer_layer, steer_layers, steer_coef, steer_alpha)):
            fail("--steer-layer/--steer-layers/--steer-coef/--steer-alpha need --steer-vector")
        out = out or Path("runs") / "finetune" / data.stem
        try:
            res = finetune(adapter, data, out, cfg, steering=steering, base_name=model, force=force,
                           profile_name=profile)
        except (DatasetError, ValueError) as e:
            fail(str(e))
        losses = f"loss {res.losses[0]:.3f} → {res.losses[-1]:.3f}" if res.losses else ""
        console.print(f"adapter: {res.out_dir} ({res.steps} steps on {res.rows} rows, {res.seconds:.0f} s; {losses})")
        console.print(f"use it with any command: --model {res.out_dir}")

    @app.command("shift")
    def shift_cmd(
        vector: Annotated[Path, typer.Option(help="Persona vector file.")],
        finetuned: Annotated[Path, typer.Option(help="Adapter directory of the finetuned model.")],
        base: Annotated[str, typer.Option(help="Base model (default: the one the adapter names).")] = "",
        trait: Annotated[str | None, typer.Option(help="Trait (default: the vector's).")] = None,
        layer: Annotated[int | None, typer.Option(help="Layer (default: the vector's layer).")] = None,
        questions: Annotated[int | None, typer.Option(help="Use the first N evaluation questions "
                                                           "(default 8).")] = 8,
        max_new_tokens: Annotated[int | None, typer.Option(help="Answer length for the judged evaluation.")
                                  ] = None,
        judge: Annotated[bool, typer.Option(help="Judge trait score and coherence (--no-judge: shift only).")
                         ] = True,
        capability: Annotated[bool, typer.Option(help="Multiple-choice accuracy before and after.")] = True,
        capability_file: Annotated[Path | None, typer.Option(help="MMLU-style JSONL (default: built-in).")
                                   ] = None,
        out: Annotated[Path | None, typer.Option(help="Run directory (default runs/shift-ADAPTER).")] = None,
        judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
        judge_mode: JudgeModeOpt = None,
        judge_url: JudgeUrlOpt = None,
        device: DeviceOpt = None,
    ) -> None:
        """Finetuning shift along a persona vector at every layer, plus judged trait score and capability."""
        from dataclasses import replace

        from rich.table import Table

        from personascope.commands.common import console, fail, load_adapter, load_judge, load_vector_for

        from ..adapter import ModelAdapter
        from ..finetune import adapter_base_name, is_adapter_dir, load_finetuned
        from ..plots import plt, save_figure
        from ..shift import finetuning_shift
        from ..store import write_json
        from ..traits import TraitError, load_trait

        if not is_adapter_dir(finetuned):
            fail(f"{finetuned} is not an adapter directory (no adapter_config.json)")
        base_name = base or adapter_base_name(finetuned)
        base_adapter = load_adapter(base_name, device)
        pv = load_vector_for(base_adapter, vector)
        try:
            t = load_trait(trait or pv.trait)
        except TraitError as e:
            fail(f"{e} (pass --trait)")
        with console.status(f"loading {finetuned} …"):
            ft_adapter = ModelAdapter(*load_finetuned(base_name, finetuned, device=device))
        try:
            la = base_adapter.check_layer(pv.default_layer(layer))
            res = finetuning_shift(base_adapter, ft_adapter, t, pv, la, questions)
        except ValueError as e:
            fail(str(e))
        run_dir = out or Path("runs") / f"shift-{Path(finetuned).name}"
        table = Table(title=f"finetuning shift of {finetuned} along {t.name} (last prompt token, "
                            f"{res.n_prompts} eval prompts)")
        table.add_column("layer")
        table.add_column("shift (a_ft − a_base)·v̂")
        for i, s in enumerate(res.per_layer):
            mark = " ◀ chosen" if i == res.layer else ""
            table.add_row(str(i), f"{s:+.3f}{mark}")
        console.print(table)
        summary = {"base": base_name, "finetuned": str(finetuned), "trait": t.name, "vector": str(vector),
                   "layer": res.layer, "shift": res.shift, "shift_per_layer": res.per_layer,
                   "shift_per_prompt": res.per_prompt}
        if judge:
            from ..evaluate import EVAL_PROFILES, Condition, print_rows
            from ..evaluate import evaluate as run_eval

            j = load_judge(judge_model, judge_mode, device, judge_url)
            cfg = replace(EVAL_PROFILES["quick"], n_questions=questions)
            if max_new_tokens:
                cfg = replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=max_new_tokens))
            rows = []
            for name, ad in (("base", base_adapter), ("finetuned", ft_adapter)):
                r = run_eval(ad, t, j, [Condition(label=name)], run_dir / name, cfg=cfg)[0]
                rows.append(r)
                summary[f"{name}_trait"] = r["trait_mean"]
                summary[f"{name}_coherence"] = r["coherence_mean"]
            print_rows(rows, f"{t.name}: base vs finetuned (judge {j.name}, {j.mode_for('trait')})")
        if capability:
            from ..capability import load_mc, mc_accuracy

            mc = load_mc(capability_file)
            for name, ad in (("base", base_adapter), ("finetuned", ft_adapter)):
                summary[f"{name}_capability"] = mc_accuracy(ad, mc).accuracy
            console.print(f"capability accuracy: base {summary['base_capability']:.3f} → finetuned "
                          f"{summary['finetuned_capability']:.3f} (n={len(mc)})")
        console.print(f"shift at layer {res.layer}: [bold]{res.shift:+.3f}[/]")
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot(range(len(res.per_layer)), res.per_layer, marker="o", ms=3)
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(res.layer, color="tab:red", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("shift along v̂")
        ax.set_title(f"{t.name}: finetuning shift ({Path(finetuned).name})", fontsize=9)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_figure(fig, run_dir / "shift.png")
        write_json(run_dir / "shift.json", summary)
        console.print(f"results: {run_dir / 'shift.json'}, plot {run_dir / 'shift.png'}")
        console.print(f"mitigate after the fact: personascope evaluate {t.name} --model {finetuned} "
                      f"--vector {vector} --layer {res.layer} --alpha -0.5")
