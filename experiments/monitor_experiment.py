"""Monitoring, rerun: does the last prompt token's projection predict the judged trait? Several traits.

    nice .venv/bin/python experiments/monitor_experiment.py --model qwen2.5-coder-0.5b \\
        --traits humorous,optimistic,evil --judge-model qwen2.5-coder-0.5b

For each trait: the ready-made vector of the model (or `--vectors-dir DIR/TRAIT.safetensors`), its built-in
9-rung system-prompt ladder and 0/5/10/15/20-shot prompts (in-context examples: the best-judged pos answers of
the trait's extraction run, `RUNS/TRAIT-MODEL-builtin/answers.jsonl`, made by experiments/vectors/build.py),
× all 20 evaluation questions, one sampled answer each (temperature 1). `personascope.monitor_run.run_monitor`
generates with a live trace (resumable, in `--work`), judges, and gives Pearson r over single responses and
over condition means, each with a bootstrap 95 % interval, and r at every layer. This script collects the
traits into `--out`: report.md (beside the paper's r), r_by_layer.png, scatter-TRAIT.png, results.json.

Time on 2 CPU cores (0.5B subject, probe judge, 48 tokens, shots cut to 160 characters): 26–41 min per trait for
both experiments (2026-12-02, sharing the cores with other runs), about a third of it the ladder.
`--judge-url` takes an OpenAI-compatible judge; `--model` any local path or built-in name (a GPU: `--device`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt

from personascope.judges import make_judge
from personascope.model import DEFAULT_JUDGE_MODEL, ModelAdapter, load_model
from personascope.monitor import MONITOR_PROFILES, load_shot_pool, run_monitor
from personascope.traits import load_trait
from personascope.util import format_ci, save_figure, write_json
from personascope.vectors import VectorMismatchError, load_vector

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="built-in short name or local path")
    p.add_argument("--traits", default="humorous,optimistic,evil",
                   help="comma-separated built-in traits; TRAIT:system runs only the ladder for that trait")
    p.add_argument("--vectors-dir", type=Path, default=None,
                   help="folder with TRAIT.safetensors (default: the package's ready-made vectors for --model)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the extraction runs lie (shot examples)")
    p.add_argument("--experiments", default="system,shots", help="system, shots or both")
    p.add_argument("--questions", type=int, default=20, help="evaluation questions per condition")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--shot-chars", type=int, default=240, help="truncate each in-context answer (0: whole)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible judge endpoint (else a local judge)")
    p.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL, help="judge model (the API model with --judge-url)")
    p.add_argument("--device", default=None)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "monitor-experiment", help="answers, traces, scores")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "monitor")
    args = p.parse_args(argv)
    args.traits = [t.strip() for t in args.traits.split(",") if t.strip()]
    args.experiments = tuple(e.strip() for e in args.experiments.split(",") if e.strip())
    if not args.traits or not set(args.experiments) <= {"system", "shots"} or not args.experiments:
        p.error("--traits must name at least one trait; --experiments must be system, shots or both")
    return args


def model_tag(model: str) -> str:
    return Path(model).name if Path(model).exists() else model


def run_trait(adapter: ModelAdapter, judge, spec: str, args) -> dict:
    """One trait's monitoring run (resumable); returns its summary for the report. `spec`: TRAIT or
    TRAIT:EXPERIMENT (only that experiment for it)."""
    trait_name, _, only = spec.partition(":")
    experiments = (only,) if only else args.experiments
    if not set(experiments) <= {"system", "shots"}:
        sys.exit(f"error: --traits {spec!r}: the experiment after ':' must be system or shots")
    trait = load_trait(trait_name)
    tag = model_tag(args.model)
    source = args.vectors_dir / f"{trait_name}.safetensors" if args.vectors_dir else Path(trait_name)
    try:
        pv = load_vector(source, trait_name, tag)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        sys.exit(f"error: {e}")
    pool = None
    if "shots" in experiments:
        run_dir = args.runs / f"{trait_name}-{tag}-builtin"
        try:
            pool = load_shot_pool(run_dir / "answers.jsonl", run_dir / "scores.jsonl", trait.eval_questions)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}; build it with experiments/vectors/build.py --traits {trait_name}")
    cfg = replace(MONITOR_PROFILES["quick"], n_questions=args.questions, samples=args.samples,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge_batch_size=args.batch_size,
                  shot_chars=args.shot_chars or None, experiments=experiments)
    res = run_monitor(adapter, trait, judge, pv, args.work / f"{trait_name}-{tag}", cfg, shot_pool=pool,
                      screenshot=False)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(res.files["scatter"], args.out / f"scatter-{trait_name}.png")
    return {"trait": trait_name, "layer": res.layer, "vector": str(pv.path), "seconds": round(res.seconds),
            "validity": validity_at(pv.metadata.get("validity"), res.layer),
            "experiments": {e: {k: v for k, v in r.items() if k != "conditions"} | {
                "conditions": [{k: c[k] for k in ("label", "n", "projection_mean", "trait_mean", "coherence_mean")}
                               for c in r["conditions"]]} for e, r in res.experiments.items()},
            "examples": examples(res.records)}


def validity_at(raw: str | None, layer: int) -> dict | None:
    """The vector's validity checks at `layer`, from its metadata (None when it has none)."""
    if not raw:
        return None
    v = json.loads(raw)
    if layer not in v.get("layers", []):
        return None
    i = v["layers"].index(layer)
    return {k: v[k][i] for k in ("held_out_auroc", "split_half_cosine", "ladder_spearman") if v.get(k)}


def examples(records: list[dict], n: int = 2) -> list[dict]:
    """The highest- and lowest-judged answers of each experiment, for reading beside the numbers."""
    picked = []
    for e in ("system", "shots"):
        recs = sorted((r for r in records if r["experiment"] == e and r.get("trait_score") is not None),
                      key=lambda r: r["trait_score"])
        for r in recs[-n:][::-1] + recs[:n]:
            picked.append({"experiment": e, "condition": r["label"], "question": r["question_text"],
                           "trait_score": round(r["trait_score"], 1), "projection": round(r["projection"], 3),
                           "answer": r["answer"][:300]})
    return picked


def fmt(x: float | None, ci=None) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}" + format_ci(ci)


def report(results: list[dict], args, seconds: float) -> str:
    lines = [
        f"# Monitoring on {model_tag(args.model)}: last-prompt-token projection vs judged trait",
        "",
        f"Produced by `experiments/monitor_experiment.py` (this invocation {seconds / 60:.0f} min, resuming from the "
        "answers cached in --work; a whole run takes 26–41 min per trait on 2 CPU cores). "
        f"{args.questions} evaluation questions × {args.samples} sample(s) per condition, temperature 1, "
        f"≤ {args.max_new_tokens} new tokens; system-prompt ladder of 9 rungs (suppressing → eliciting) and "
        f"0/5/10/15/20-shot prompts (in-context answers cut to {args.shot_chars} characters); judge "
        f"`{args.judge_url or args.judge_model}`. In brackets: bootstrap 95 % intervals (answers resampled for r over "
        "responses, questions resampled for r over condition means). Paper: Qwen2.5-7B / Llama-3.1-8B, GPT-4.1-mini "
        "judge.",
        "",
        "| trait | layer | experiment | n | r (condition means) | r (responses) | paper r | trait range over "
        "conditions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["experiments"].values():
            tm = [c["trait_mean"] for c in r["conditions"] if c["trait_mean"] is not None]
            span = f"{min(tm):.0f}–{max(tm):.0f}" if tm else "—"
            lines.append(f"| {res['trait']} | {res['layer']} | {r['title']} | {r['n_scored']} "
                         f"({r.get('n_refusals', 0)} refusals out) | "
                         f"{fmt(r['r_condition_means'], r.get('r_condition_means_ci'))} | {fmt(r['r'], r.get('r_ci'))} "
                         f"| {fmt(r.get('paper_r'))} | {span} |")
    lines += ["", "![r by layer](r_by_layer.png)", ""]
    for res in results:
        lines += [f"## {res['trait']}", "", f"![scatter](scatter-{res['trait']}.png)", ""]
        for r in res["experiments"].values():
            lines += [f"**{r['title']}**: condition means", "", "| condition | n | projection | trait | coherence |",
                      "|---|---|---|---|---|"]
            lines += [f"| {c['label']} | {c['n']} | {fmt(c['projection_mean'])} | {fmt(c['trait_mean'])} | "
                      f"{fmt(c['coherence_mean'])} |" for c in r["conditions"]]
            lines.append("")
        lines += ["Answers at the extremes of the judged trait (read them):", ""]
        for x in res["examples"]:
            text = x["answer"].replace("\n", " ").replace("|", "\\|")
            lines.append(f"- {x['experiment']} · {x['condition']} · trait {x['trait_score']} · projection "
                         f"{x['projection']}: *{x['question']}* — {text}")
        lines.append("")
    return "\n".join(lines)


def plot_layers(results: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, e in zip(axes, ("system", "shots"), strict=True):
        for res in results:
            r = res["experiments"].get(e)
            if r is None:
                continue
            ys = [float("nan") if v is None else v for v in r["r_by_layer"]]
            line = ax.plot(range(len(ys)), ys, marker="o", ms=3, label=res["trait"])[0]
            ax.axvline(res["layer"], color=line.get_color(), ls=":", lw=0.8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title({"system": "system-prompt ladder", "shots": "many-shot"}[e], fontsize=10)
        ax.set_xlabel("layer (dotted: the vector's chosen layer)")
        ax.set_ylim(-1, 1)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("Pearson r, projection vs trait (responses)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    model, tok = load_model(args.model, device=args.device)
    adapter = ModelAdapter(model, tok)
    judge = make_judge(args.judge_model, None, args.judge_url, args.device)
    results = []
    for t in args.traits:
        results.append(run_trait(adapter, judge, t, args))
        write_json(args.out / "results.json", {"model": args.model, "judge": judge.name, "traits": results})
    plot_layers(results, args.out / "r_by_layer.png")
    (args.out / "report.md").write_text(report(results, args, time.time() - t0))
    print(json.dumps({r["trait"]: {e: x["r_condition_means"] for e, x in r["experiments"].items()} for r in results}))


if __name__ == "__main__":
    main()
