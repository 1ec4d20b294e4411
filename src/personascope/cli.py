"""The `personascope` command line: a thin layer over the library's functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .models import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL

app = typer.Typer(help="Find, monitor and control character traits (persona vectors) in language models.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
traits_app = typer.Typer(help="List, show and validate trait data.", no_args_is_help=True)
vector_app = typer.Typer(help="Inspect persona vector files.", no_args_is_help=True)
app.add_typer(traits_app, name="traits")
app.add_typer(vector_app, name="vector")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in short name, local path or HF name.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, mps or cpu (default: best available).")]
JudgeModelOpt = Annotated[str, typer.Option("--judge-model", help="Local judge model (or the API model with "
                                                                   "--judge-url).")]
JudgeModeOpt = Annotated[str | None, typer.Option("--judge-mode", help="Trait scoring mode of a local judge: "
                                                  "contrastive, binary, 0_100 or fewshot.")]
ProfileOpt = Annotated[str, typer.Option(help="quick (CPU-sized) or paper (the paper's counts).")]
EngineOpt = Annotated[str, typer.Option("--engine", help="hf, vllm or auto (vLLM when installed and the job is "
                                          "big enough to repay its start-up).")]
JudgeUrlOpt = Annotated[str | None, typer.Option("--judge-url", help="OpenAI-compatible base URL of an API judge "
                                                 "(--judge-model then names the API model).")]


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


def _adapter(model: str, device: str | None):
    from .adapter import ModelAdapter
    from .models import load_model

    with console.status(f"loading {model} …"):
        m, tok = load_model(model, device=device)
    return ModelAdapter(m, tok)


def _judge(judge_model: str, judge_mode: str | None, device: str | None, judge_url: str | None = None):
    from .api_judge import make_judge

    with console.status(f"loading judge {judge_model} …"):
        return make_judge(judge_model, judge_mode, judge_url, device)


def _engines(engine: str, adapter, judge, n_answers: int, new_tokens: int):
    """The generation engine for `adapter` (HF or vLLM by --engine) and the same choice for a local judge."""
    from .engines import make_engine, make_judge_engine
    from .engines.jobs import work_tokens

    with console.status(f"starting the {engine} engine …"):
        gen = make_engine(engine, adapter, work_tokens(n_answers, 100, new_tokens))
        used = make_judge_engine(engine, judge, 2 * n_answers)
    console.print(f"engines: generation {gen.name}" + (f", judge {used}" if used else ""))
    return gen


# ---------------------------------------------------------------- traits


@traits_app.command("list")
def traits_list() -> None:
    """List the built-in traits."""
    from .traits import builtin_traits, load_trait

    table = Table(title="built-in traits")
    for col in ("name", "antonym", "extract q", "eval q", "first pos instruction"):
        table.add_column(col)
    for name in builtin_traits():
        t = load_trait(name)
        table.add_row(name, t.antonym or "helpful", str(len(t.extract_questions)), str(len(t.eval_questions)),
                      t.instructions[0]["pos"][:70] + "…")
    console.print(table)


@traits_app.command("show")
def traits_show(name_or_path: str) -> None:
    """Validate and show a trait (built-in name or a JSON file / directory)."""
    from .traits import TraitError, load_trait

    try:
        t = load_trait(name_or_path)
    except TraitError as e:
        _fail(str(e))
    console.print(f"[bold]{t.name}[/]  ({t.source})")
    table = Table(title="instructions (system prompts)")
    table.add_column("#")
    table.add_column("pos")
    table.add_column("neg")
    for i in range(len(t.instructions)):
        table.add_row(str(i), t.system_prompt("pos", i), t.system_prompt("neg", i))
    console.print(table)
    for title, qs in (("extraction questions", t.extract_questions), ("evaluation questions", t.eval_questions)):
        qt = Table(title=title)
        qt.add_column("#")
        qt.add_column("question")
        for i, q in enumerate(qs):
            qt.add_row(str(i), q)
        console.print(qt)
    console.print("[bold]judge rubric[/]")
    console.print(t.eval_prompt, markup=False)


# ---------------------------------------------------------------- extraction


@app.command()
def extract(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = "quick",
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/TRAIT-MODEL).")] = None,
    samples: Annotated[int | None, typer.Option(help="Samples per prompt.")] = None,
    questions: Annotated[int | None, typer.Option(help="Use the first N extraction questions.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    pos_threshold: Annotated[float | None, typer.Option()] = None,
    neg_threshold: Annotated[float | None, typer.Option()] = None,
    coherence_threshold: Annotated[float | None, typer.Option()] = None,
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    judge_mode: JudgeModeOpt = None,
    judge_url: JudgeUrlOpt = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option(help="Start over instead of resuming.")] = False,
    engine: EngineOpt = "auto",
) -> None:
    """Extract a persona vector: generate, judge, filter, extract (resumable)."""
    from .extract import answer_jobs, extract_vector
    from .extract import profile as make_profile
    from .traits import TraitError, load_trait

    try:
        t = load_trait(trait)
    except TraitError as e:
        _fail(str(e))
    cfg = make_profile(profile, samples=samples, n_questions=questions, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed,
                       pos_threshold=pos_threshold, neg_threshold=neg_threshold,
                       coherence_threshold=coherence_threshold)
    adapter = _adapter(model, device)
    judge = _judge(judge_model, judge_mode, device, judge_url)
    try:
        gen_engine = _engines(engine, adapter, judge, len(answer_jobs(t, cfg)), cfg.sampling.max_new_tokens)
        extract_vector(adapter, t, judge=judge, config=cfg, run_dir=out, force=force, engine=gen_engine)
    except ValueError as e:
        _fail(str(e))


@vector_app.command("info")
def vector_info(path: Path) -> None:
    """Print a vector file's metadata and per-layer norms."""
    from .vectors import load_vector

    try:
        pv = load_vector(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    table = Table(title=str(path))
    table.add_column("key")
    table.add_column("value")
    for k, v in sorted(pv.metadata.items()):
        table.add_row(k, v)
    table.add_row("spans", ", ".join(pv.vectors))
    table.add_row("shape", f"{pv.n_layers + 1} × {pv.hidden_size}")
    console.print(table)
    norms = pv.vectors["response_avg"].norm(dim=-1)
    console.print("‖v[l]‖: " + " ".join(f"{i}:{float(n):.2f}" for i, n in enumerate(norms)))


# ---------------------------------------------------------------- steering and evaluation


def _floats(values: list[str] | None) -> list[float]:
    out = []
    for v in values or []:
        out += [float(x) for x in str(v).split(",") if x.strip()]
    return out


def _load_vector_for(adapter, path: Path | None):
    from .vectors import VectorMismatchError, load_vector

    if path is None:
        return None
    try:
        pv = load_vector(path)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        _fail(str(e))
    return pv


@app.command()
def evaluate(
    trait: Annotated[str, typer.Argument(help="Built-in trait name or trait JSON path.")],
    model: ModelOpt = DEFAULT_MODEL,
    vector: Annotated[Path | None, typer.Option(help="Persona vector file to steer with.")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="Layer(s), e.g. --layer 12,16 (default: the "
                                                        "vector's chosen layer).")] = None,
    coef: Annotated[list[str] | None, typer.Option(help="Raw coefficient(s), e.g. --coef -2,0,2.")] = None,
    alpha: Annotated[list[str] | None, typer.Option(help="Relative coefficient(s): coef·‖v‖/resid_norm.")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt or response.")] = "response",
    system: Annotated[list[str] | None, typer.Option(help="'pos', 'neg' (the trait's instruction 0) or any "
                                                          "system text; repeatable.")] = None,
    profile: ProfileOpt = "quick",
    questions: Annotated[int | None, typer.Option(help="Use the first N evaluation questions.")] = None,
    samples: Annotated[int | None, typer.Option()] = None,
    capability: Annotated[bool, typer.Option(help="Also report multiple-choice accuracy.")] = False,
    capability_file: Annotated[Path | None, typer.Option(help="MMLU-style JSONL (default: built-in).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    judge_mode: JudgeModeOpt = None,
    judge_url: JudgeUrlOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Judge answers to the evaluation questions: plain, prompted and/or steered (sweeps)."""
    from dataclasses import replace

    from .evaluate import EVAL_PROFILES, Condition, print_rows, sweep_conditions, sweep_rows
    from .plots import plot_sweep
    from .traits import TraitError, load_trait

    try:
        t = load_trait(trait)
    except TraitError as e:
        _fail(str(e))
    adapter = _adapter(model, device)
    pv = _load_vector_for(adapter, vector)
    cfg = EVAL_PROFILES[profile]
    if questions or samples:
        cfg = replace(cfg, n_questions=questions or cfg.n_questions,
                      sampling=replace(cfg.sampling, samples=samples or cfg.sampling.samples))
    conditions = [Condition()]
    layers = [int(x) for x in _floats(layer)] or ([pv.default_layer()] if pv else [])
    if pv is not None:
        for la in layers:
            try:
                adapter.check_layer(la)
            except ValueError as e:
                _fail(str(e))
        if alpha and len(layers) > 1:
            _fail("--alpha is converted per layer; give one --layer with --alpha, or use --coef for a sweep")
        coefs = _floats(coef) + [pv.coef_from_alpha(a, layers[0]) for a in _floats(alpha)]
        conditions = sweep_conditions(layers, coefs or [1.0], positions)
    for sys_text in system or []:
        text = t.system_prompt(sys_text, 0) if sys_text in ("pos", "neg") else sys_text
        conditions.append(Condition(system=text, label=f"system:{sys_text}"))
    run_dir = out or Path("runs") / f"eval-{t.name}-{adapter.name.replace('/', '_')}"
    judge = _judge(judge_model, judge_mode, device, judge_url)
    from .evaluate import evaluate as run_eval

    rows = run_eval(adapter, t, judge, conditions, run_dir, vector=pv, cfg=cfg)
    if capability:
        from .capability import load_mc, mc_accuracy
        from .steer import Steerer

        mc = load_mc(capability_file)
        for r in rows:
            st = Steerer(adapter)
            if r["layer"] is not None and r["coef"]:
                st.add(pv, r["layer"], r["coef"], r["positions"])
            prompt_sys = r["system"]
            if prompt_sys:
                r["capability"] = None  # system-prompted MC is not measured
                continue
            r["capability"] = mc_accuracy(adapter, mc, steerer=st).accuracy
    print_rows(rows, f"{t.name} on {adapter.name} (judge {judge.name}, {judge.describe_mode('trait', t)})")
    if pv is not None and len(conditions) > 2:
        plot_sweep(sweep_rows(rows, layers), run_dir / "sweep.png", f"{t.name} steering sweep ({adapter.name})")
        console.print(f"sweep plot: {run_dir / 'sweep.png'}")
    from .store import write_json

    write_json(run_dir / "summary.json", [{k: v for k, v in r.items() if k != "per_question"} for r in rows])
    console.print(f"results: {run_dir / 'summary.json'}")


@app.command("choose-layer")
def choose_layer_cmd(
    trait: str,
    vector: Annotated[Path, typer.Option(help="Persona vector file.")],
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option(help="Candidate layers, e.g. 8,12,16,20 (default: every "
                                                     "fourth layer from L/4).")] = None,
    coef: Annotated[float | None, typer.Option(help="Raw coefficient for the sweep.")] = None,
    alpha: Annotated[float, typer.Option(help="Relative coefficient used when --coef is not given.")] = 0.5,
    min_coherence: Annotated[float, typer.Option()] = 75.0,
    questions: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path | None, typer.Option()] = None,
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    judge_mode: JudgeModeOpt = None,
    judge_url: JudgeUrlOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Steer at one coefficient over candidate layers; record the best layer in the vector file."""
    from dataclasses import replace

    from .evaluate import EVAL_PROFILES, Condition, choose_layer, evaluate, print_rows
    from .traits import load_trait

    t = load_trait(trait)
    adapter = _adapter(model, device)
    pv = _load_vector_for(adapter, vector)
    cands = [int(x) for x in layers.split(",")] if layers else list(range(max(1, adapter.n_layers // 4),
                                                                          adapter.n_layers, 4))
    conds = [Condition()]
    for la in cands:
        c = coef if coef is not None else pv.coef_from_alpha(alpha, la)
        conds.append(Condition(la, c, "response"))
    cfg = EVAL_PROFILES["quick"]
    if questions:
        cfg = replace(cfg, n_questions=questions)
    judge = _judge(judge_model, judge_mode, device, judge_url)
    rows = evaluate(adapter, t, judge, conds, out or Path("runs") / f"choose-layer-{t.name}", vector=pv, cfg=cfg)
    print_rows(rows, f"choose layer for {t.name}")
    best, detail = choose_layer(rows, min_coherence)
    if best is None:
        _fail(f"no candidate layer kept mean coherence ≥ {min_coherence}; try a smaller --alpha/--coef")
    pv.with_metadata(best_layer=best, layer_choice=json.dumps(detail)).save(vector)
    console.print(f"best layer: [bold]{best}[/] (recorded in {vector})")


# ---------------------------------------------------------------- judge quality


@app.command("judge-eval")
def judge_eval(
    judge_model: JudgeModelOpt = DEFAULT_JUDGE_MODEL,
    mode: Annotated[list[str] | None, typer.Option("--mode", help="Trait modes to compare (repeatable).")] = None,
    coherence_mode: Annotated[list[str] | None, typer.Option("--coherence-mode")] = None,
    trait: Annotated[list[str] | None, typer.Option("--trait", help="Limit to these traits.")] = None,
    limit: Annotated[int | None, typer.Option(help="Rows per set (balanced).")] = None,
    out: Path = Path("runs/judge-eval"),
    device: DeviceOpt = None,
) -> None:
    """Measure a judge's agreement with the shipped labelled answers (AUC, accuracy, calibration)."""
    from .judge import DEFAULT_COHERENCE_MODE, DEFAULT_TRAIT_MODE, LocalJudge
    from .judge_eval import evaluate_judge, plot_reliability, results_table
    from .models import load_model
    from .store import write_json
    from .traits import builtin_traits

    m, tok = load_model(judge_model, device=device)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for tm in mode or [DEFAULT_TRAIT_MODE]:
        j = LocalJudge(m, tok, trait_mode=tm, name=f"local:{judge_model}")
        res = evaluate_judge(j, trait or builtin_traits(), limit)
        plot_reliability(res, out / f"reliability_{tm}.png")
        rows += results_table(res)
    for cm in coherence_mode or [DEFAULT_COHERENCE_MODE]:
        j = LocalJudge(m, tok, coherence_mode=cm, name=f"local:{judge_model}")
        res = evaluate_judge(j, ["coherence"], limit)
        plot_reliability(res, out / f"reliability_coherence_{cm}.png")
        rows += results_table(res)
    write_json(out / "judge_eval.json", rows)
    table = Table(title=f"judge agreement: local:{judge_model}")
    for col in ("set", "mode", "AUC", "acc@50", "mean +", "mean −", "missing", "s/judgement"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["mode"], f"{r['auc']:.3f}", f"{r['accuracy']:.2f}", f"{r['mean_pos']:.1f}",
                      f"{r['mean_neg']:.1f}", str(r["missing"]), f"{r['seconds_per_judgement']:.2f}")
    for tm in mode or [DEFAULT_TRAIT_MODE]:
        aucs = [r["auc"] for r in rows if r["mode"] == tm and r["name"] != "coherence"]
        if aucs:
            table.add_row("[bold]mean (traits)", tm, f"{sum(aucs) / len(aucs):.3f}", "", "", "", "", "")
    console.print(table)
    console.print(f"wrote {out / 'judge_eval.json'} and reliability plots")


# ---------------------------------------------------------------- demo


@app.command()
def demo(
    trait: str = "optimistic",
    model: ModelOpt = DEFAULT_MODEL,
    out: Path = Path("runs/demo"),
    device: DeviceOpt = None,
) -> None:
    """The main job on the embedded model: extract a vector, then steer with it side by side."""
    from .demo import run_demo

    run_demo(trait, model, out, device)


def _register_command_groups() -> None:
    from .commands import finetune, monitor, screen, serve

    for module in (monitor, finetune, screen, serve):
        module.register(app)


_register_command_groups()

if __name__ == "__main__":
    app()
