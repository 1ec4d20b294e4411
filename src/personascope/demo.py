"""The README's main job on the embedded model: extract a persona vector, check it, then steer with it."""

from __future__ import annotations

import html
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .adapter import ModelAdapter
from .evaluate import Condition, EvalConfig, evaluate, print_rows, sweep_rows
from .extract import extract_vector, profile
from .generate import SamplingConfig
from .judge import Judge, load_local_judge
from .judge_probe import ProbeJudge, ProbeWeights, probe_weights_path
from .models import load_model
from .plots import plot_sweep
from .store import write_json
from .traits import load_trait
from .vectors import find_packaged, load_vector

console = Console()
DEMO_ALPHA = 1.0  # used when no ready-made vector has a measured α for the trait and model


def demo_judge(adapter: ModelAdapter, judge_name: str | None, device: str | None) -> Judge:
    """The probe judge on the subject model itself when the package has its weights (one model in memory,
    ~0.1 s per answer), else the local LLM judge `judge_name`."""
    weights = probe_weights_path(adapter.name)
    if judge_name is None and weights.exists():
        return ProbeJudge(adapter, ProbeWeights.load(weights), name=f"probe:{adapter.name}")
    from .models import DEFAULT_JUDGE_MODEL

    return load_local_judge(judge_name or DEFAULT_JUDGE_MODEL, device=device)


def demo_alphas(trait: str, model: str) -> tuple[float, float]:
    """(−α, +α) for the steering step: the ready-made vector's measured best α per direction, else ±DEMO_ALPHA."""
    path = find_packaged(f"{model}/{trait}")
    steering = json.loads(load_vector(path).metadata.get("steering", "{}")) if path else {}
    return (steering.get("alpha_minus") or -DEMO_ALPHA, steering.get("alpha_plus") or DEMO_ALPHA)


def run_demo(trait_name: str, model_name: str, out: Path, device: str | None = None,
             judge_name: str | None = None, n_questions: int = 6, seed: int = 0) -> dict:
    """Extract `trait_name` on the model (`builtin` profile, `n_questions` questions, `seed`), print its
    validity, then answer evaluation questions at −α, 0, +α; returns the demo's summary (also summary.json)."""
    trait = load_trait(trait_name)
    with console.status(f"loading {model_name} …"):
        model, tok = load_model(model_name, device=device)
        adapter = ModelAdapter(model, tok)
        judge = demo_judge(adapter, judge_name, device)
    q = trait.extract_questions[0]
    console.rule(f"[bold]1. extract the {trait.name!r} persona vector from {adapter.name} (seed {seed})")
    console.print(f"e.g. pos system prompt: [italic]{trait.system_prompt('pos', 0)}[/]\nquestion: [italic]{q}[/]")
    pv = extract_vector(adapter, trait, judge=judge, run_dir=out / "extract",
                        config=profile("builtin", n_questions=n_questions, seed=seed))
    layer = pv.default_layer()
    alphas = demo_alphas(trait.name, adapter.name)
    coefs = [pv.coef_from_alpha(a, layer) for a in alphas]
    console.rule(f"[bold]2. steer at layer {layer} with α = {alphas[0]:g}, 0, {alphas[1]:g} "
                 f"(raw coef {coefs[0]:.2f}, 0, {coefs[1]:.2f})")
    conds = [Condition(layer, coefs[0], "response"), Condition(), Condition(layer, coefs[1], "response")]
    cfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=64, batch_size=n_questions),
                     n_questions=n_questions)
    rows = evaluate(adapter, trait, judge, conds, out / "steer", vector=pv, cfg=cfg)
    print_rows(rows, f"{trait.name}: judged trait score by steering coefficient ({judge.name})")
    side_by_side(rows, trait.name)
    plot = plot_sweep(sweep_rows(rows, [layer]), out / "steer" / "sweep.png",
                      f"{trait.name} steering on {adapter.name}")
    report = write_report(rows, out / "report.html", trait.name, adapter.name, plot)
    validity = json.loads(pv.metadata["validity"])
    base = rows[1]
    at = (alphas[0], 0, alphas[1])
    summary = {
        "trait": trait.name, "model": adapter.name, "seed": seed, "judge": judge.name, "layer": layer,
        "alphas": list(alphas), "kept_pairs": int(pv.metadata["kept_pairs"]), "validity": validity["at_layer"],
        "valid": validity["valid"], "trait_mean": {str(a): r["trait_mean"] for a, r in zip(at, rows, strict=True)},
        "coherence_mean": {str(a): r["coherence_mean"] for a, r in zip(at, rows, strict=True)},
        "delta_minus": None if rows[0]["trait_mean"] is None or base["trait_mean"] is None
        else rows[0]["trait_mean"] - base["trait_mean"],
        "delta_plus": None if rows[2]["trait_mean"] is None or base["trait_mean"] is None
        else rows[2]["trait_mean"] - base["trait_mean"],
        "vector": pv.path, "report": str(report),
    }
    write_json(out / "summary.json", summary)
    console.print(f"\nvector: {pv.path}\nsweep plot: {plot}\nreport: {report}")
    return summary


def side_by_side(rows: list[dict], trait: str, n: int = 3) -> None:
    table = Table(title=f"the same questions at each coefficient ({trait} score in brackets)", show_lines=True)
    table.add_column("question", max_width=28)
    for r in rows:
        table.add_column(f"coef {r['coef']:.2f}", max_width=40)
    for i in range(min(n, len(rows[0]["per_question"]))):
        cells = [rows[0]["per_question"][i]["question"]]
        for r in rows:
            pq = r["per_question"][i]
            score = "—" if pq["trait_score"] is None else f"{pq['trait_score']:.0f}"
            cells.append(f"[{score}] {pq['answer'][:220]}")
        table.add_row(*cells)
    console.print(table)


def write_report(rows: list[dict], path: Path, trait: str, model: str, plot: Path) -> Path:
    """A self-contained HTML page: the sweep plot and answers side by side with their scores."""
    head = "".join(f"<th>coef {r['coef']:.2f}<br>trait {r['trait_mean'] or 0:.1f}, "
                   f"coherence {r['coherence_mean'] or 0:.1f}</th>" for r in rows)
    body = ""
    for i, pq0 in enumerate(rows[0]["per_question"]):
        cells = ""
        for r in rows:
            pq = r["per_question"][i]
            score = "—" if pq["trait_score"] is None else round(pq["trait_score"])
            cells += f"<td><b>[{score}]</b> {html.escape(pq['answer'])}</td>"
        body += f"<tr><td>{html.escape(pq0['question'])}</td>{cells}</tr>"
    path.write_text(
        f"<!doctype html><meta charset=utf-8><title>personascope: {trait}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:6px;vertical-align:top;"
        "font-size:13px}table{border-collapse:collapse}</style>"
        f"<h1>Steering {html.escape(model)} along the {html.escape(trait)} persona vector</h1>"
        f"<p>Judge: {html.escape(rows[0]['judge'])} ({html.escape(rows[0]['judge_mode'])}). "
        "System text actually rendered for the unsteered prompt:</p>"
        f"<pre>{html.escape(rows[1]['system_rendered'])}</pre>"
        f"<img src='{plot.relative_to(path.parent)}' width=800>"
        f"<table><tr><th>question</th>{head}</tr>{body}</table>")
    return path
