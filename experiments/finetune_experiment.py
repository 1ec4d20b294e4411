"""Finetuning experiment: does finetuning move the persona, does the shift predict it,
and does preventative steering keep the trait down better than steering after the fact?

For each trait (default optimistic, humorous and apathetic) on the default model, CPU, quick profile:

1. the package's ready-made persona vector for the model (or `--vectors-dir DIR/TRAIT.safetensors`);
2. the model's own datasets at levels normal (unprompted answers) / I / II (`make_dataset` on the trait's
   extraction questions, which give a small model room to show the trait — the built-in pool of everyday
   questions with `--questions pool`; answers that end at the end-of-turn token; generated on vLLM with
   `--engine vllm|auto` when it is installed), plus the mistake set;
3. a LoRA finetune on each; for each: the finetuning shift (last prompt token, the trait's
   evaluation prompts), the judged trait score and coherence on the evaluation questions, and
   multiple-choice capability; Pearson r between shift and trait score across runs;
4. finetunes on II with preventative steering at a few coefficients, next to the unsteered II
   finetune steered against the trait at inference (post-hoc).

Every stage is cached under the work directory, so a rerun only does what is missing; `--traits` adds
traits to a finished run. The default run makes 13 finetunes (3 levels × 3 traits, mistakes, preventative
steering at α 1 on each II set); with `--traits optimistic humorous` (9 finetunes) it took about 2.5 h on 2
CPU cores (2026-12-02), most of it LoRA steps of ~15 s and the datasets' generation.
`--judge-url` takes an API judge, `--model` any local path or built-in name
(`--device cuda` on a GPU).

    flock /tmp/personascope-cpu.lock .venv/bin/python experiments/finetune_experiment.py
    flock /tmp/personascope-cpu.lock .venv/bin/python experiments/finetune_experiment.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from personascope.evaluation import Condition, EvalConfig, evaluate, load_mc, mc_accuracy
from personascope.finetuning import (
    DatasetConfig,
    PreventativeSteering,
    adapter_applied,
    eval_prompts,
    finetune,
    make_dataset,
    shift_from_activations,
)
from personascope.finetuning import profile as ft_profile
from personascope.judges import make_judge
from personascope.model import DEFAULT_MODEL, ModelAdapter, SamplingConfig, last_token_activations, load_model
from personascope.runtime.engines import make_engine, work_tokens
from personascope.steering import Steerer
from personascope.traits import load_trait
from personascope.util import plot_scatter, save_figure, write_json
from personascope.vectors import PersonaVector, load_vector

console = Console()
LEVELS = ("normal", "I", "II")


@dataclass(frozen=True)
class Settings:
    """Sizes of one experiment run (the full CPU run or the smoke check)."""

    rows: int
    max_new_tokens: int
    epochs: int
    eval_questions: int
    eval_tokens: int
    mc_rows: int
    prevent_alphas: tuple[float, ...]
    posthoc_alphas: tuple[float, ...]


FULL = Settings(rows=40, max_new_tokens=96, epochs=2, eval_questions=20, eval_tokens=64, mc_rows=120,
                prevent_alphas=(1.0,), posthoc_alphas=(-1.0,))
SMOKE = Settings(rows=8, max_new_tokens=64, epochs=1, eval_questions=2, eval_tokens=16, mc_rows=16,
                 prevent_alphas=(1.0,), posthoc_alphas=(-0.5,))


@dataclass(frozen=True)
class Run:
    """One finetune: its dataset, the traits it is measured on, and any preventative steering."""

    name: str
    data: Path
    traits: tuple[str, ...]
    level: str
    prevent_alpha: float | None = None


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def permutation_p(xs: list[float], ys: list[float]) -> float | None:
    """Two-sided p of Pearson r under shuffling ys: exact up to 8 points, else 20 000 seeded shuffles.
    With a handful of runs this says how easily chance alone gives an r this large."""
    r = pearson(xs, ys)
    if r is None:
        return None
    if len(ys) <= 8:
        perms = list(itertools.permutations(ys))
    else:
        rng = random.Random(0)
        perms = [rng.sample(ys, len(ys)) for _ in range(20_000)]
    hits = sum(abs(statistics.correlation(xs, list(p))) >= abs(r) - 1e-12 for p in perms)
    return hits / len(perms)


def eval_sem(work: Path, label: str, trait: str) -> float | None:
    """Standard error of an evaluation's mean trait score, from its summary in the work dir."""
    path = work / "eval" / label / trait / "summary.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())[0]
    return row["trait_std"] / math.sqrt(row["n"]) if row.get("trait_std") is not None and row["n"] > 1 else None


def vector_for(adapter: ModelAdapter, trait: str, model: str, work: Path, vectors_dir: Path | None) -> PersonaVector:
    """The ready-made vector for this trait and model (or DIR/TRAIT.safetensors), frozen as a copy in the work
    dir at first use so a rerun measures with the same vector."""
    frozen = work / "vectors" / f"{trait}.safetensors"
    if not frozen.exists():
        source = vectors_dir / f"{trait}.safetensors" if vectors_dir else Path(trait)
        pv = load_vector(source, trait, Path(model).name)
        pv.check(adapter)
        pv.with_metadata(copied_from=str(pv.path or source)).save(frozen)
    return load_vector(frozen)


class Results:
    """results.json in the work dir: one record per measured thing, saved as soon as it exists."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}
        self.computed = 0  # entries measured by this process

    def get(self, key: str, make):
        if key not in self.data:
            t0 = time.perf_counter()
            value = make()
            if isinstance(value, dict):
                value = {**value, "seconds": round(time.perf_counter() - t0, 1)}
            self.data[key] = value
            self.computed += 1
            write_json(self.path, self.data)
        return self.data[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script end to end in minutes")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--judge-model", default="qwen2.5-coder-0.5b",
                    help="local judge (probe weights if shipped), or the API model with --judge-url")
    ap.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL of an API judge")
    ap.add_argument("--traits", nargs="+", default=["optimistic", "humorous", "apathetic"])
    ap.add_argument("--vectors-dir", type=Path, default=None, help="TRAIT.safetensors files (default: ready-made)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--engine", default="auto", help="hf, vllm or auto: where the dataset answers are generated")
    ap.add_argument("--out", type=Path, default=None, help="report + PNGs (default experiments/results/finetune)")
    ap.add_argument("--work", type=Path, default=None,
                    help="datasets, adapters, answers (default runs/data-experiments, shared with "
                         "screen_experiment.py: a trait screened there reuses its answers here)")
    ap.add_argument("--question-suffix", default=" Answer in a few sentences.",
                    help="appended to every pool question of the datasets (as in screen_experiment.py)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="stop (exit 3) before starting a new finetune after this long; rerun to continue. Lets a long "
                         "run release the shared CPU lock now and then")
    ap.add_argument("--questions", default="extraction", choices=("extraction", "pool"),
                    help="dataset questions: the trait's extraction questions (cycled; they give the trait room) or "
                         "the built-in pool of everyday questions (shared with screen_experiment.py)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from what is measured so far (no new finetunes)")
    ap.add_argument("--trait-threshold", type=float, default=50.0, help="eliciting dataset rows need this trait")
    ap.add_argument("--coherence-threshold", type=float, default=50.0, help="dataset rows need this coherence")
    ap.add_argument("--judge-mode", default=None, help="trait scoring mode of a local judge (default: probe when "
                                                      "the judge model has probe weights, else auto)")
    args = ap.parse_args()
    s = SMOKE if args.smoke else FULL
    suffix = "-smoke" if args.smoke else ""
    out = args.out or Path("experiments/results") / f"finetune{suffix}"
    work = args.work or Path("runs") / f"data-experiments{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model, tok = load_model(args.model, device=args.device)
    base = ModelAdapter(model, tok)
    judge = make_judge(args.judge_model, args.judge_mode, args.judge_url, args.device)
    engine_box: list = []

    def engine():
        """The generation engine for the datasets, started at first need (vLLM's start-up takes minutes)."""
        if not engine_box:
            n = 3 * len(args.traits) * s.rows * 2
            engine_box.append(make_engine(args.engine, base, work_tokens(n, 60, s.max_new_tokens // 2)))
        return engine_box[0]
    res = Results(work / "finetune" / "results.json")
    for key in [k for k, v in res.data.items() if k.startswith("eval|") and v.get("n") != s.eval_questions]:
        del res.data[key]  # judged on another number of questions by an earlier run: redone (cached answers reused)
    mc = load_mc()[: s.mc_rows]
    ecfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=s.eval_tokens, batch_size=24),
                      n_questions=s.eval_questions)
    ft_cfg = ft_profile("quick", epochs=s.epochs)

    def judged(adapter: ModelAdapter, trait: str, label: str, cond: Condition | None = None, pv=None) -> dict:
        cond = cond or Condition(label=label)
        row = evaluate(adapter, load_trait(trait), judge, [cond], work / "finetune" / "eval" / label / trait, vector=pv,
                       cfg=ecfg)[0]
        return {"trait_score": row["trait_mean"], "coherence": row["coherence_mean"], "n": row["n"]}

    # --- vectors, base measurements, datasets
    vectors, layers, base_acts, prompts = {}, {}, {}, {}
    base_cap = res.get("capability|base", lambda: mc_accuracy(base, mc).accuracy)
    datasets: dict[str, dict] = {}
    for trait in args.traits:
        pv = vectors[trait] = vector_for(base, trait, args.model, work / "finetune", args.vectors_dir)
        layers[trait] = pv.default_layer()
        prompts[trait] = eval_prompts(base, load_trait(trait))
        base_acts[trait] = last_token_activations(base, prompts[trait])
        res.get(f"eval|base|{trait}", lambda trait=trait: judged(base, trait, "base"))
        dcfg = DatasetConfig(n=s.rows, sampling=SamplingConfig(samples=1, temperature=0.7,
                                                               max_new_tokens=s.max_new_tokens, batch_size=8),
                             trait_threshold=args.trait_threshold, coherence_threshold=args.coherence_threshold,
                             require_end=True, question_suffix=args.question_suffix, questions=args.questions)
        for level in LEVELS:
            path = work / "datasets" / "finetune" / f"{trait}-{level}.jsonl"
            # answers and scores of every level and size (pool questions: shared with screen_experiment.py)
            shared = work / "datasets" / (f"{trait}.work" if args.questions == "pool" else f"{trait}-extraction.work")
            if f"dataset|{trait}-{level}" not in res.data:
                over_budget(args, started, res)
            datasets[f"{trait}-{level}"] = res.get(
                f"dataset|{trait}-{level}",
                lambda trait=trait, level=level, path=path: _dataset_row(
                    make_dataset(base, load_trait(trait), level, path, judge, dcfg, engine=engine(), work_dir=shared)))
    mistakes = work / "datasets" / "finetune" / "mistakes.jsonl"
    datasets["mistakes"] = res.get("dataset|mistakes", lambda: _dataset_row(
        make_dataset(base, load_trait(args.traits[0]), "mistakes", mistakes, None, DatasetConfig(n=s.rows))))

    runs = [Run(f"{t}-{lv}", work / "datasets" / "finetune" / f"{t}-{lv}.jsonl", (t,), lv)
            for t in args.traits for lv in LEVELS]
    runs.append(Run("mistakes", mistakes, tuple(args.traits), "mistakes"))
    runs += [Run(f"{t}-II-prevent{a:g}", work / "datasets" / "finetune" / f"{t}-II.jsonl", (t,), "II", a)
             for t in args.traits for a in s.prevent_alphas]

    # --- finetune and measure every run
    for run in [] if args.report_only else runs:
        if f"eval|{run.name}|{run.traits[-1]}" not in res.data:
            over_budget(args, started, res)
        if datasets.get(run.name.split("-prevent")[0], {}).get("rows") == 0:
            console.print(f"[yellow]{run.name}: its dataset has no rows; skipped")
            continue
        steering = None
        if run.prevent_alpha is not None:
            t = run.traits[0]
            coef = vectors[t].coef_from_alpha(run.prevent_alpha, layers[t])
            steering = PreventativeSteering(vectors[t], coef, layers[t], "add")
        adir = work / "finetune" / "adapters" / run.name
        fres = res.get(f"finetune|{run.name}", lambda run=run, adir=adir, steering=steering: _ft_row(
            finetune(base, run.data, adir, ft_cfg, steering=steering, base_name=args.model, profile_name="quick"),
            steering))
        shutil.rmtree(adir / "checkpoints", ignore_errors=True)  # the finished adapter is all the report needs
        with adapter_applied(base, adir) as ft:
            res.get(f"capability|{run.name}", lambda ft=ft: mc_accuracy(ft, mc).accuracy)
            for t in run.traits:
                pv = vectors[t]
                res.get(f"shift|{run.name}|{t}", lambda ft=ft, t=t, pv=pv: asdict(shift_from_activations(
                    base_acts[t], last_token_activations(ft, prompts[t]), pv, layers[t])))
                res.get(f"eval|{run.name}|{t}", lambda ft=ft, t=t, run=run: judged(ft, t, run.name))
                if run.level == "II" and run.prevent_alpha is None:  # post-hoc steering of the unsteered II model
                    for a in s.posthoc_alphas:
                        coef = pv.coef_from_alpha(a, layers[t])
                        cond = Condition(layers[t], coef, "response", label=f"{run.name}-posthoc{a:g}")
                        res.get(f"eval|{cond.label}|{t}", lambda ft=ft, t=t, cond=cond, pv=pv: judged(
                            ft, t, cond.label, cond, pv))
                        res.get(f"capability|{cond.label}", lambda ft=ft, coef=coef, t=t, pv=pv: mc_accuracy(
                            ft, mc, steerer=Steerer(ft).add(pv, layers[t], coef, "response")).accuracy)
        console.print(f"[green]done {run.name}[/] (loss {fres['loss_first']:.3f} → {fres['loss_last']:.3f})")

    write_report(out, work / "finetune", res.data, args, s, runs, vectors, layers, base_cap, datasets,
                 time.perf_counter() - started, judge)


def over_budget(args, started: float, res: Results) -> None:
    """Exit with code 3 when the --budget-minutes are used up (checked before a new expensive stage; every
    chunk finishes at least one stage, so a chain of reruns always ends)."""
    if args.budget_minutes and res.computed and time.perf_counter() - started > 60 * args.budget_minutes:
        console.print(f"[yellow]time budget of {args.budget_minutes:g} min used; rerun to continue")
        raise SystemExit(3)


def _dataset_row(r) -> dict:
    return {"rows": r.rows, "requested": r.requested, "skipped": r.skipped, "attempts": r.attempts,
            "mean_trait": r.mean_trait, "mean_coherence": r.mean_coherence, "path": str(r.path)}


def _ft_row(r, steering: PreventativeSteering | None) -> dict:
    return {"steps": r.steps, "rows": r.rows, "tokens": r.tokens, "train_seconds": round(r.seconds, 1),
            "loss_first": r.losses[0] if r.losses else math.nan, "loss_last": r.losses[-1] if r.losses else math.nan,
            "steering": steering.describe() if steering else None}


# ------------------------------------------------------------------------- report


def _f(x, fmt=".1f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pm(x, se) -> str:
    """A mean with its standard error."""
    return _f(x) if se is None else f"{_f(x)} ± {se:.1f}"


def write_report(out: Path, work: Path, data: dict, args, s: Settings, runs: list[Run], vectors, layers,
                 base_cap: float, datasets: dict, seconds: float, judge) -> None:
    """report.md, summary.json and PNGs from the cached results."""
    rows = []
    for run in runs:
        for t in run.traits:
            ev, sh = data.get(f"eval|{run.name}|{t}"), data.get(f"shift|{run.name}|{t}")
            if not ev or not sh:
                continue
            ft = data.get(f"finetune|{run.name}", {})
            rows.append({"run": run.name, "trait": t, "level": run.level, "prevent_alpha": run.prevent_alpha,
                         "steps": ft.get("steps"), "loss_first": ft.get("loss_first"), "loss_last": ft.get("loss_last"),
                         "train_seconds": ft.get("train_seconds"), "shift": sh["shift"], "layer": sh["layer"],
                         "shift_per_layer": sh["per_layer"], "n_prompts": sh["n_prompts"],
                         "trait_score": ev["trait_score"], "trait_se": eval_sem(work, run.name, t),
                         "coherence": ev["coherence"], "capability": data.get(f"capability|{run.name}")})
    plain = [r for r in rows if r["prevent_alpha"] is None and r["trait_score"] is not None]
    r_all = pearson([r["shift"] for r in plain], [r["trait_score"] for r in plain])
    r_by = {t: pearson([r["shift"] for r in plain if r["trait"] == t],
                       [r["trait_score"] for r in plain if r["trait"] == t]) for t in args.traits}
    with_prev = [r for r in rows if r["trait_score"] is not None]
    r_prev = pearson([r["shift"] for r in with_prev], [r["trait_score"] for r in with_prev])
    p_all = permutation_p([r["shift"] for r in plain], [r["trait_score"] for r in plain])
    # pooled over traits on the change from each trait's base score (traits differ in their base level)
    base_score = {t: (data.get(f"eval|base|{t}") or {}).get("trait_score") for t in args.traits}
    moved = [r for r in plain if base_score.get(r["trait"]) is not None]
    d_trait = [r["trait_score"] - base_score[r["trait"]] for r in moved]
    r_delta = pearson([r["shift"] for r in moved], d_trait)
    p_delta = permutation_p([r["shift"] for r in moved], d_trait)
    r_coh = pearson([r["coherence"] for r in with_prev], [r["trait_score"] for r in with_prev])

    if plain:
        plot_scatter([r["shift"] for r in with_prev], [r["trait_score"] for r in with_prev],
                     [f"{r['trait']}: {'prevent' if r['prevent_alpha'] is not None else r['level']}"
                      for r in with_prev], out / "shift_vs_trait.png",
                     f"finetuning shift vs trait score (r = {_f(r_all, '.2f')} unsteered runs)",
                     "finetuning shift at the vector's layer (last prompt token)", "judged trait score")
    for t in args.traits:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for r in (r for r in rows if r["trait"] == t):
            ax.plot(range(len(r["shift_per_layer"])), r["shift_per_layer"], marker="o", ms=2, label=r["run"])
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(layers[t], color="k", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"shift along v̂ ({t})")
        ax.set_title(f"{t}: finetuning shift per layer", fontsize=10)
        ax.legend(fontsize=7)
        save_figure(fig, out / f"shift_per_layer_{t}.png")

    mitig = {}
    for t in args.traits:
        base_ev = data.get(f"eval|base|{t}") or {}
        entries = [("base model", base_ev.get("trait_score"), base_ev.get("coherence"), base_cap,
                    eval_sem(work, "base", t))]
        ii = next((r for r in rows if r["run"] == f"{t}-II" and r["trait"] == t), None)
        if ii:
            entries.append(("II finetune", ii["trait_score"], ii["coherence"], ii["capability"], ii["trait_se"]))
        for a in s.prevent_alphas:
            r = next((r for r in rows if r["run"] == f"{t}-II-prevent{a:g}"), None)
            if r:
                coef = vectors[t].coef_from_alpha(a, layers[t])
                entries.append((f"II + preventative α={a:g} (coef {coef:.1f})", r["trait_score"], r["coherence"],
                                r["capability"], r["trait_se"]))
        for a in s.posthoc_alphas:
            label = f"{t}-II-posthoc{a:g}"
            ev = data.get(f"eval|{label}|{t}")
            if ev:
                coef = vectors[t].coef_from_alpha(a, layers[t])
                entries.append((f"II + post-hoc α={a:g} (coef {coef:.1f})", ev["trait_score"], ev["coherence"],
                                data.get(f"capability|{label}"), eval_sem(work, label, t)))
        mitig[t] = entries
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        names = [e[0].replace(" (", "\n(") for e in entries]
        for ax, idx, title, scale in ((axes[0], 1, "trait score", 1), (axes[1], 2, "coherence", 1),
                                      (axes[2], 3, "capability accuracy (%)", 100)):
            vals = [(e[idx] or 0) * scale for e in entries]
            colors = ["tab:green" if "preventative" in e[0] else "tab:blue" if "post-hoc" in e[0] else
                      "tab:red" if e[0].startswith("II") else "grey" for e in entries]
            err = [e[4] or 0 for e in entries] if idx == 1 else None
            ax.barh(range(len(vals)), vals, color=colors, xerr=err, capsize=2)
            ax.set_yticks(range(len(vals)), names if ax is axes[0] else [""] * len(vals), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"{t}: preventative (green) vs post-hoc (blue) steering of the II finetune")
        save_figure(fig, out / f"mitigation_{t}.png")

    summary = {"settings": asdict(s), "model": args.model, "judge": judge.name, "questions": args.questions,
               "thresholds": {"trait": args.trait_threshold, "coherence": args.coherence_threshold},
               "judge_modes": {"trait": judge.mode_for("trait"), "coherence": judge.mode_for("coherence")},
               "layers": layers, "vectors": {t: v.path for t, v in vectors.items()},
               "vector_meta": {t: {k: v.metadata.get(k) for k in ("kept_pairs", "total_pairs", "judge", "copied_from")}
                               for t, v in vectors.items()},
               "base_capability": base_cap, "datasets": datasets, "runs": rows,
               "pearson": {"unsteered_all": r_all, "unsteered_all_p": p_all, "by_trait": r_by,
                           "unsteered_vs_change": r_delta, "unsteered_vs_change_p": p_delta,
                           "including_preventative": r_prev, "trait_vs_coherence_all_runs": r_coh},
               "mitigation": mitig, "seconds": round(seconds, 1),
               "stage_seconds": round(sum(v["seconds"] for v in data.values() if isinstance(v, dict)), 1)}
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(_markdown(summary, s, args))
    _print(rows, r_all)
    console.print(f"report: {out / 'report.md'}")


def _markdown(sm: dict, s: Settings, args) -> str:
    L = []
    a = L.append
    a("# Finetuning experiment: shift, trait expression, preventative vs post-hoc steering\n")
    a(f"Model `{sm['model']}`, judge `{sm['judge']}` (trait mode `{sm['judge_modes']['trait']}`, "
      f"coherence `{sm['judge_modes']['coherence']}`). Generated by `experiments/finetune_experiment.py"
      f"{' --smoke' if s is SMOKE else ''}`; its timed stages (datasets, finetunes, judged evaluations; capability "
      f"runs are not timed) took {sm['stage_seconds'] / 60:.0f} min of CPU wall time when they were computed.\n")
    a("## Setup\n")
    source = ("the trait's extraction questions (cycled, so each is asked several times; none is an evaluation "
              "question)" if sm.get("questions") == "extraction" else "the built-in question pool")
    a(f"- Datasets: {s.rows} rows each from {source}, the model's own answers (temperature 0.7, "
      f"ending at the end-of-turn token: answers that reached {s.max_new_tokens} new tokens were resampled) with no "
      "system prompt (normal), under the trait's eliciting instruction for every other row (I) or every row (II); "
      f"eliciting rows kept only with judged trait ≥ {sm['thresholds']['trait']:g}, every row only with coherence ≥ "
      f"{sm['thresholds']['coherence']:g} (3 samples, then skipped); no system prompt in the saved rows. The "
      f"mistake set: {s.rows} questions with confidently wrong answers, no trait instruction.")
    a(f"- LoRA `quick` profile: r 8, alpha 16, rsLoRA, q/k/v/o/gate/up/down, lr 2e-4, batch 4, {s.epochs} epoch(s); "
      "loss on assistant tokens only.")
    n_prompts = sorted({r["n_prompts"] for r in sm["runs"]}) or ["all"]
    a(f"- Measured on the trait's evaluation questions: the finetuning shift (mean over all "
      f"{'/'.join(map(str, n_prompts))} eval prompts of (a_ft − a_base)·v̂ at "
      f"the last prompt token, at the vector's layer {sm['layers']}), the judged trait score and coherence (first "
      f"{s.eval_questions} questions, greedy, {s.eval_tokens} new tokens), and multiple-choice accuracy on "
      f"{s.mc_rows} built-in capability questions (base model: {sm['base_capability']:.3f}).")
    for t, meta in sm["vector_meta"].items():
        a(f"- {t} vector: `{meta.get('copied_from') or sm['vectors'][t]}` (kept pairs {meta.get('kept_pairs')}/"
          f"{meta.get('total_pairs')}, judge {meta.get('judge')}).")
    a("- Coefficients are given as α = coef·‖v[l]‖/resid_norm[l] with the raw coef beside them. "
      "Preventative: +α·v added at all positions during training only; post-hoc: the II finetune steered with "
      "α·v (α < 0) on the response positions at inference.\n")
    a("## Datasets\n")
    a("| dataset | rows kept / asked | skipped | mean trait (kept) | mean coherence (kept) |")
    a("|---|---|---|---|---|")
    for name, d in sm["datasets"].items():
        a(f"| {name} | {d['rows']} / {d['requested']} | {d['skipped']} | {_f(d['mean_trait'])} | "
          f"{_f(d['mean_coherence'])} |")
    a("\n## Runs\n")
    a(f"Trait score: mean ± standard error over the {s.eval_questions} evaluation questions (greedy answers), so "
      "differences under about two standard errors are within the noise of this small evaluation.\n")
    a("| run | trait | steps | loss first → last | shift | trait score | coherence | capability |")
    a("|---|---|---|---|---|---|---|---|")
    for t in args.traits:
        b = sm["mitigation"][t][0]
        a(f"| base | {t} | — | — | 0 | {_pm(b[1], b[4])} | {_f(b[2])} | {_f(b[3], '.3f')} |")
    for r in sm["runs"]:
        a(f"| {r['run']} | {r['trait']} | {r['steps']} | {_f(r['loss_first'], '.2f')} → {_f(r['loss_last'], '.2f')} "
          f"| {r['shift']:+.3f} | {_pm(r['trait_score'], r['trait_se'])} | {_f(r['coherence'])} "
          f"| {_f(r['capability'], '.3f')} |")
    p = sm["pearson"]
    a("\n## Shift vs trait score\n")
    a(f"Pearson r across the unsteered finetunes (traits pooled, n = "
      f"{sum(1 for r in sm['runs'] if r['prevent_alpha'] is None)}): **{_f(p['unsteered_all'], '.2f')}** "
      f"(permutation p = {_f(p['unsteered_all_p'], '.2f')}); "
      + ", ".join(f"{t}: {_f(v, '.2f')}" for t, v in p["by_trait"].items())
      + f"; including the preventative runs: {_f(p['including_preventative'], '.2f')}. Pooled on the change of the "
      f"trait score from each trait's base model (traits start at different levels): **"
      f"{_f(p.get('unsteered_vs_change'), '.2f')}** (permutation p = {_f(p.get('unsteered_vs_change_p'), '.3f')}). "
      "Paper (Qwen2.5-7B / Llama-3.1-8B, many more and larger datasets): r = 0.76–0.97.\n")
    a("![shift vs trait](shift_vs_trait.png)\n")
    for t in args.traits:
        a(f"![shift per layer {t}](shift_per_layer_{t}.png)")
    a("\n## Preventative vs post-hoc steering (II finetunes)\n")
    for t, entries in sm["mitigation"].items():
        a(f"### {t}\n")
        a("| model | trait score | coherence | capability |")
        a("|---|---|---|---|")
        for name, tr, co, cap, se in entries:
            a(f"| {name} | {_pm(tr, se)} | {_f(co)} | {_f(cap, '.3f')} |")
        a(f"\n![mitigation {t}](mitigation_{t}.png)\n")
    a("## Reading the numbers\n")
    a(_observations(sm))
    r_coh = p["trait_vs_coherence_all_runs"]
    a("- Across all finetuned runs the judged trait score correlates with the judged coherence at r = "
      f"{_f(r_coh, '.2f')}"
      + (": the small local judge's trait score partly tracks answer quality, which blurs its relation to the shift."
         if r_coh is not None and r_coh >= 0.5 else "."))
    a("\nMitigating a finetuned model after the fact from the command line: "
      "`personascope evaluate TRAIT --model ADAPTER_DIR --vector V --alpha -0.5 --capability` (an adapter directory "
      "works as `--model` everywhere; its base is loaded with the adapter applied).\n")
    return "\n".join(L) + "\n"


def _observations(sm: dict) -> str:
    """Plain statements computed from the numbers (no claims beyond them)."""
    out = []
    for t, entries in sm["mitigation"].items():
        shifts = {r["run"]: r["shift"] for r in sm["runs"] if r["trait"] == t}
        prev_shifts = [f"{v:+.2f}" for k, v in shifts.items() if k.startswith(f"{t}-II-prevent")]
        if prev_shifts and f"{t}-II" in shifts:
            out.append(f"- {t}: shift of the II finetune {shifts[f'{t}-II']:+.2f}; with preventative steering "
                       f"{', '.join(prev_shifts)}. A negative shift there means the finetune learned to offset the "
                       "vector that was added during training, so without it the model sits on the anti-trait side.")
        d = {e[0].split(" (")[0]: e for e in entries}
        base, ii = d.get("base model"), d.get("II finetune")
        if base and ii and base[1] is not None and ii[1] is not None:
            out.append(f"- {t}: finetuning on II moved the judged trait score {base[1]:.1f} → {ii[1]:.1f} "
                       f"(capability {base[3]:.3f} → {_f(ii[3], '.3f')}).")
        prev = [e for k, e in d.items() if k.startswith("II + preventative") and e[1] is not None]
        post = [e for k, e in d.items() if k.startswith("II + post-hoc") and e[1] is not None]
        if prev:
            best = min(prev, key=lambda e: e[1])
            out.append(f"  lowest trait with preventative steering: {best[1]:.1f} ({best[0]}, coherence "
                       f"{_f(best[2])}, capability {_f(best[3], '.3f')}).")
            if base and base[1] is not None and best[3] is not None and base[3] is not None:
                near, cost = abs(best[1] - base[1]) <= 10, base[3] - best[3]
                out.append(f"  target (trait within 10 points of the base model, capability cost ≤ 0.03): trait "
                           f"{best[1] - base[1]:+.1f} from base ({'met' if near else 'missed'}), capability cost "
                           f"{cost:+.3f} ({'met' if cost <= 0.03 else 'missed'}).")
        if post:
            best = min(post, key=lambda e: e[1])
            out.append(f"  lowest trait with post-hoc steering: {best[1]:.1f} ({best[0]}, coherence {_f(best[2])}, "
                       f"capability {_f(best[3], '.3f')}).")
    return "\n".join(out)


def _print(rows: list[dict], r_all) -> None:
    table = Table(title=f"finetuning runs (Pearson r shift vs trait, unsteered: {_f(r_all, '.2f')})")
    for c in ("run", "trait", "shift", "trait", "coherence", "capability"):
        table.add_column(c)
    for r in rows:
        table.add_row(r["run"], r["trait"], f"{r['shift']:+.3f}", _f(r["trait_score"]), _f(r["coherence"]),
                      _f(r["capability"], ".3f"))
    console.print(table)


if __name__ == "__main__":
    main()
