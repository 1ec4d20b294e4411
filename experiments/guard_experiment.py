"""Persona guard vs constant steering: trait under eliciting prompts, and what it costs on neutral prompts.

    flock /tmp/personascope-cpu.lock .venv/bin/python experiments/guard_experiment.py \\
        --model qwen2.5-coder-0.5b --vector runs/optimistic-qwen2.5-coder-0.5b/vector.safetensors

1. Calibrate the guard: per-token projections of the model's own greedy answers to pool questions, at
   the layer; hi = the --percentile (the calibration is kept in OUT/calibration.json, not in the vector).
2. Under the trait's eliciting system prompts (its pos instructions) × its evaluation questions, judge
   the trait of greedy answers with no guard, capping at hi, conditional steering (the --cond-alpha
   steering added only while the projection is above hi) and constant steering at a sweep of alphas,
   then at the alpha interpolated to give the same trait reduction as each guard.
3. On neutral prompts (other pool questions, no system prompt): the fraction of greedy answers whose
   text changed at all, and the multiple-choice capability score (the built-in set) under each condition.

Everything is cached in --out (answers, scores, capability, calibration), so a rerun redoes only what is
missing. Writes OUT/report.md, OUT/guard.png and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from personascope.evaluation import Condition, condition_capability, condition_hooks, guard_annotator, load_mc
from personascope.judges import ScoreCache, judge_answers, make_judge
from personascope.model import DEFAULT_JUDGE_MODEL, ModelAdapter, SamplingConfig, load_model, run_generation
from personascope.steering import GuardCalibration, calibrate_guard, pool_sample
from personascope.traits import Trait, load_trait
from personascope.util import JsonlStore, bootstrap_ci, format_ci, save_figure, write_json
from personascope.vectors import PersonaVector, VectorMismatchError, load_vector

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "experiments" / "results" / "guard"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="built-in short name or local path")
    p.add_argument("--vector", required=True, type=Path, help="persona vector file for that model")
    p.add_argument("--trait", default=None, help="trait (default: the vector's)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the vector's chosen layer)")
    p.add_argument("--n-questions", type=int, default=10,
                   help="evaluation questions per eliciting prompt, and twice as many neutral pool questions")
    p.add_argument("--n-systems", type=int, default=2, help="eliciting system prompts (the trait's pos instructions)")
    p.add_argument("--n-calibration", type=int, default=48, help="pool questions for the guard's calibration")
    p.add_argument("--percentile", type=float, default=99.0, help="per-token percentile that sets hi")
    p.add_argument("--cond-alpha", type=float, default=-0.5, help="alpha of the conditional steering")
    p.add_argument("--alphas", default="-0.1,-0.25,-0.5,-1.0", help="constant steering sweep (alphas)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-mc", type=int, default=None, help="capability questions (default: all built-in)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible judge endpoint (else a local judge)")
    p.add_argument("--judge-model", default=DEFAULT_JUDGE_MODEL, help="judge model (the API model with --judge-url)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.n_questions < 1 or args.n_systems < 1 or args.n_calibration < 1:
        p.error("--n-questions, --n-systems and --n-calibration must be at least 1")
    try:
        args.alphas = sorted({float(x) for x in args.alphas.split(",") if x.strip()} | {args.cond_alpha},
                             key=abs)
    except ValueError:
        p.error(f"--alphas must be comma-separated numbers, got {args.alphas!r}")
    return args


def calibration(adapter: ModelAdapter, pv: PersonaVector, layer: int, args, out: Path) -> GuardCalibration:
    """The guard's range at `layer` from pool questions 0..n_calibration-1 (cached)."""
    path = out / "calibration.json"
    want = {"layer": layer, "percentile": args.percentile, "n_questions": args.n_calibration}
    if path.exists():
        cal = GuardCalibration(**json.loads(path.read_text()))
        if {k: getattr(cal, k) for k in want} == want:
            return cal
    cal = calibrate_guard(adapter, pv, layer, args.percentile, questions=pool_sample(args.n_calibration),
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    write_json(path, json.loads(cal.to_json()))
    return cal


def generate(adapter: ModelAdapter, store: JsonlStore, cond: Condition, pv: PersonaVector, prompts: list[dict],
             args) -> list[dict]:
    """Greedy answers to prompts ({set, system, question_text}) under a condition, cached with guard counts."""
    jobs = [{**p, "condition": cond.key} for p in prompts]
    hooks = condition_hooks(adapter, cond, pv)
    annotate = guard_annotator(hooks)
    cfg = SamplingConfig(samples=1, temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    with hooks:
        run_generation(adapter, jobs, lambda j: adapter.prompt(j["question_text"], j["system"]),
                       lambda j: store.key(j) in store, store.append, cfg, f"{jobs[0]['set']} {cond.key}",
                       annotate=annotate)
    return [store.get(store.key(j)) for j in jobs]


def mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def equal_reduction_alpha(target: float, sweep: list[tuple[float, float]]) -> tuple[float, bool]:
    """The alpha whose (interpolated) trait reduction equals `target`; sweep = [(alpha, reduction)] from alpha 0.

    Returns (alpha, reached): when no sweep point reduces the trait that much, the strongest alpha, not reached.
    """
    pts = sorted(sweep, key=lambda p: abs(p[0]))
    for (a0, r0), (a1, r1) in zip(pts, pts[1:], strict=False):
        if r0 <= target <= r1 and r1 > r0:
            return a0 + (a1 - a0) * (target - r0) / (r1 - r0), True
    return pts[-1][0], False


def run(args) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    adapter = ModelAdapter(model, tok)
    try:
        pv = load_vector(args.vector)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        sys.exit(f"error: {e}")
    if pv.resid_norm is None:
        sys.exit(f"error: {args.vector} has no resid_norm, so alphas cannot be converted")
    trait: Trait = load_trait(args.trait or pv.trait)
    layer = pv.default_layer(args.layer)
    adapter.check_layer(layer)
    judge = make_judge(args.judge_model, None, args.judge_url, args.device)
    cal = calibration(adapter, pv, layer, args, out)
    print(f"guard range at layer {layer}: hi {cal.hi:+.3f} (p{args.percentile:g} of {cal.n} tokens)", file=sys.stderr)

    eliciting = [{"set": "eliciting", "system": trait.system_prompt("pos", s), "question_text": q, "question": i,
                  "sys_index": s}
                 for s in range(min(args.n_systems, len(trait.instructions)))
                 for i, q in enumerate(trait.eval_questions[: args.n_questions])]
    banned = set(trait.eval_questions) | set(trait.extract_questions)
    neutral_qs = [q for q in pool_sample(None, exclude=args.n_calibration) if q not in banned][: 2 * args.n_questions]
    neutral = [{"set": "neutral", "system": None, "question_text": q, "question": i, "sys_index": -1}
               for i, q in enumerate(neutral_qs)]
    store = JsonlStore(out / "answers.jsonl", ("set", "condition", "sys_index", "question"))
    scores = ScoreCache(out / "scores.jsonl")
    cap_path = out / "capability.json"
    capability: dict[str, float] = json.loads(cap_path.read_text()) if cap_path.exists() else {}
    mc = load_mc()[: args.n_mc] if args.n_mc else load_mc()

    def coef(alpha: float) -> float:
        return pv.coef_from_alpha(alpha, layer)

    def measure(name: str, cond: Condition, neutral_too: bool = True) -> dict:
        answers = generate(adapter, store, cond, pv, eliciting, args)
        scored = judge_answers(judge, trait, answers, scores, description=f"judge {cond.key}")
        row = {"name": name, "condition": cond.key, "coef": cond.coef, "alpha": pv.alpha_from_coef(cond.coef, layer),
               "trait": mean([r["trait_score"] for r in scored]), "coherence": mean([r["coherence"] for r in scored]),
               "trait_scores": [r["trait_score"] for r in scored],
               "touched_eliciting": mean([r.get("guard_touched") for r in answers])}
        if neutral_too:
            plain = generate(adapter, store, Condition(), pv, neutral, args)
            mine = generate(adapter, store, cond, pv, neutral, args)
            row["neutral_changed"] = mean([float(a["answer"] != b["answer"]) for a, b in zip(plain, mine, strict=True)])
            row["touched_neutral"] = mean([r.get("guard_touched") for r in mine])
            if cond.key not in capability:
                capability[cond.key] = condition_capability(adapter, cond, pv, mc)
                write_json(cap_path, capability)
            row["capability"] = capability[cond.key]
        return row

    rows = [measure("no guard", Condition())]
    base = rows[0]["trait"]
    rows.append(measure("cap", Condition(layer, 0.0, guard="cap", hi=cal.hi)))
    rows.append(measure(f"conditional (α {args.cond_alpha:g})",
                        Condition(layer, coef(args.cond_alpha), guard="conditional", hi=cal.hi)))
    sweep = [measure(f"constant α {a:g}", Condition(layer, coef(a)), neutral_too=(a == args.cond_alpha))
             for a in args.alphas]
    reductions = [(0.0, 0.0)] + [(a, base - r["trait"]) for a, r in zip(args.alphas, sweep, strict=True)
                                 if r["trait"] is not None and base is not None]
    rows += sweep
    for guard_row in rows[1:3]:
        target = base - guard_row["trait"] if base is not None and guard_row["trait"] is not None else None
        if target is None or target <= 0:
            guard_row["equal_constant"] = None
            continue
        alpha, reached = equal_reduction_alpha(target, reductions)
        eq = measure(f"constant α {alpha:.3g} (= {guard_row['name'].split()[0]})", Condition(layer, coef(alpha)))
        eq["reached"] = reached
        guard_row["equal_constant"] = eq["condition"]
        rows.append(eq)
    add_intervals(rows)
    result = {"model": args.model, "vector": str(args.vector), "trait": trait.name, "layer": layer,
              "calibration": json.loads(cal.to_json()), "judge": judge.name, "n_eliciting": len(eliciting),
              "n_neutral": len(neutral), "n_mc": len(mc), "max_new_tokens": args.max_new_tokens, "rows": rows,
              "targets": targets(rows, args.cond_alpha)}
    write_json(out / "results.json", result)
    plot(rows, out / "guard.png", f"{trait.name} guard on {args.model}, layer {layer}")
    (out / "report.md").write_text(report(result))
    return result


def add_intervals(rows: list[dict]) -> None:
    """Bootstrap 95 % intervals over the eliciting prompts: each row's mean trait, and its reduction from no guard
    (paired by prompt)."""
    base = rows[0]["trait_scores"]
    for row in rows:
        pairs = [(b, x) for b, x in zip(base, row["trait_scores"], strict=True) if b is not None and x is not None]
        row["trait_ci"] = bootstrap_ci(pairs, lambda ps: mean([x for _, x in ps]))
        row["reduction_ci"] = bootstrap_ci(pairs, lambda ps: mean([b - x for b, x in ps]))


def targets(rows: list[dict], cond_alpha: float) -> dict:
    """The issue's targets, as measured (None where a number is missing)."""
    base = rows[0]
    const = next((r for r in rows if r["name"] == f"constant α {cond_alpha:g}"), None)
    out = {}
    for g in rows[1:3]:
        key = g["name"].split()[0]
        red = None if base["trait"] is None or g["trait"] is None else base["trait"] - g["trait"]
        cred = None
        if const is not None and const["trait"] is not None and base["trait"] is not None:
            cred = base["trait"] - const["trait"]
        eq = next((r for r in rows if r["condition"] == g.get("equal_constant")), None)
        out[key] = {
            "trait_reduction": red, "trait_reduction_ci": g.get("reduction_ci"), "constant_reduction_same_alpha": cred,
            "constant_reduction_ci": None if const is None else const.get("reduction_ci"),
            "half_of_constant": None if red is None or cred is None or cred <= 0 else red >= cred / 2,
            "neutral_unchanged": None if g.get("neutral_changed") is None else 1 - g["neutral_changed"],
            "neutral_90pct_unchanged": None if g.get("neutral_changed") is None else g["neutral_changed"] <= 0.10,
            "capability_delta": None if g.get("capability") is None else g["capability"] - base["capability"],
            "capability_within_0.01": None if g.get("capability") is None
            else abs(g["capability"] - base["capability"]) <= 0.01,
            "equal_constant_neutral_unchanged": None if eq is None else 1 - eq["neutral_changed"],
            "equal_constant_capability_delta": None if eq is None else eq["capability"] - base["capability"],
        }
    return out


def fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def report(res: dict) -> str:
    cal = res["calibration"]
    lines = [
        f"# Persona guard: {res['trait']} on {res['model']}",
        "",
        f"Vector `{res['vector']}`, layer {res['layer']}. Guard range from {cal['n_questions']} pool questions' "
        f"greedy answers ({cal['n']} tokens): hi = p{cal['percentile']:g} = {cal['hi']:+.3f} (mean {cal['mean']:+.3f} "
        f"± {cal['std']:.3f}). Eliciting set: {res['n_eliciting']} answers (the trait's pos system prompts × its "
        f"evaluation questions); neutral set: {res['n_neutral']} other pool questions, no system prompt; capability: "
        f"{res['n_mc']} built-in multiple-choice questions. Greedy, ≤ {res['max_new_tokens']} new tokens; judge "
        f"{res['judge']}. Produced by `experiments/guard_experiment.py`.",
        "",
        "Brackets: bootstrap 95 % intervals over the eliciting prompts (the reduction paired by prompt).",
        "",
        "| condition | α | trait (eliciting) | reduction | coherence | guard tokens/answer (eliciting) "
        "| neutral answers changed | guard tokens/answer (neutral) | capability |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        red = None if r["trait"] is None or res["rows"][0]["trait"] is None else res["rows"][0]["trait"] - r["trait"]
        lines.append(f"| {r['name']} | {fmt(r['alpha'], '.3g')} | {fmt(r['trait'])}{format_ci(r.get('trait_ci'), 1)} | "
                     f"{fmt(red)}{format_ci(r.get('reduction_ci'), 1)} | {fmt(r['coherence'])} | "
                     f"{fmt(r['touched_eliciting'])} | {fmt(r.get('neutral_changed'), '.0%')} | "
                     f"{fmt(r.get('touched_neutral'))} | {fmt(r.get('capability'), '.3f')} |")
    lines += ["", "## Targets (as measured)", ""]
    for key, t in res["targets"].items():
        lines.append(f"- **{key}**: trait reduction {fmt(t['trait_reduction'])}"
                     f"{format_ci(t.get('trait_reduction_ci'), 1)} vs constant steering at the same α "
                     f"{fmt(t['constant_reduction_same_alpha'])}{format_ci(t.get('constant_reduction_ci'), 1)} "
                     f"(≥ half: {t['half_of_constant']}); neutral answers "
                     f"unchanged {fmt(t['neutral_unchanged'], '.0%')} (≥ 90 %: {t['neutral_90pct_unchanged']}); "
                     f"capability Δ {fmt(t['capability_delta'], '+.3f')} (within 0.01: {t['capability_within_0.01']}); "
                     f"constant steering at equal trait reduction: neutral unchanged "
                     f"{fmt(t['equal_constant_neutral_unchanged'], '.0%')}, capability Δ "
                     f"{fmt(t['equal_constant_capability_delta'], '+.3f')}.")
    lines += ["", "![guard](guard.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("trait", "judged trait (eliciting prompts)"), ("neutral_changed", "neutral answers changed"),
              ("capability", "capability (MC accuracy)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        vals = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        colours = ["grey" if i == 0 else "tab:orange" if i < 3 else "tab:blue" for i in range(len(rows))]
        ax.barh(range(len(rows)), vals, color=colours)
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_xlabel(label)
    fig.suptitle(title)
    return save_figure(fig, path)


if __name__ == "__main__":
    res = run(parse_args())
    print(report(res))
