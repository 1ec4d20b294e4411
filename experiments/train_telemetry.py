"""Persona shift while training: PersonaShiftCallback on finetunes of increasing trait strength.

On the default model (CPU), for two traits with ready-made vectors: datasets of the model's own answers at
levels normal / I / II, built from the answers already recorded in experiments/real_answers (10 everyday
questions per trait, 64 new tokens, none of them an evaluation question: normal = the unprompted answers,
I = the eliciting instruction's answers for every other question, II = for all; the instruction is not in
the rows, as `make-dataset` writes them; generating fresh ones did not fit a shared 2-core box), a LoRA finetune on each
with the callback watching both vectors at its default interval (10 % of training), then a judged
evaluation, the shift measured after training and multiple-choice capability. Reports (a) the shift
curves, (b) the first checkpoint from which normal < I < II holds, (c) r between the shift at 25 % and the
final shift / the judged trait change (bootstrap intervals), (d) a `steer_above` run against the same run
without it, and the callback's overhead (the first trait's II run repeated without the callback).

    nice -n 10 .venv/bin/python experiments/train_telemetry.py            # about 30-40 min on 2 cores
    nice -n 10 .venv/bin/python experiments/train_telemetry.py --smoke    # a few minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from personascope.evaluation import Condition, EvalConfig, evaluate, load_mc, mc_accuracy
from personascope.finetuning import (
    ShiftRule,
    adapter_applied,
    chat_row,
    eval_prompts,
    finetune,
    read_trajectory,
    shift_from_activations,
    watch_traits,
)
from personascope.finetuning import profile as ft_profile
from personascope.judges import make_judge
from personascope.model import DEFAULT_MODEL, ModelAdapter, SamplingConfig, last_token_activations, load_model
from personascope.traits import load_trait
from personascope.util import bootstrap_ci, pearson_r, write_json
from personascope.vectors import load_vector

SIZES = {"full": dict(rows=10, epochs=3, eval_q=5, eval_tokens=32, mc=24, probe_q=10),
         "smoke": dict(rows=4, epochs=1, eval_q=2, eval_tokens=8, mc=4, probe_q=2)}
LEVELS = ("normal", "I", "II")
ANSWERS = Path(__file__).parent / "real_answers" / "answers-{model}.jsonl"


def write_level(model: str, trait: str, level: str, rows: int, path: Path) -> int:
    """A level's chat JSONL from the recorded answers: `none` rows, `pos` rows for every other (I) or all (II)."""
    recs = [json.loads(x) for x in ANSWERS.with_name(ANSWERS.name.format(model=model)).read_text().splitlines()]
    by = {(r["condition"], r["question_index"]): r for r in recs if r["trait"] == trait}
    qs = sorted({qi for _, qi in by})[:rows]
    pick = {"normal": lambda i: "none", "I": lambda i: "pos" if i % 2 == 0 else "none", "II": lambda i: "pos"}[level]
    chosen = [by[(pick(i), qi)] for i, qi in enumerate(qs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(chat_row(r["question"], r["answer"])) + "\n" for r in chosen))
    return len(chosen)


class Cache:
    """results.json in the work dir: one record per measured thing, saved as soon as it exists."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, make):
        if key not in self.data:
            self.data[key] = make()
            write_json(self.path, self.data)
        return self.data[key]


def res_data(work: Path) -> dict:
    """The cache of a run so far."""
    return json.loads((work / "results.json").read_text())


def at_fraction(rows: list[dict], name: str, frac: float) -> float:
    """The shift at the first measurement at or after `frac` of training."""
    last = rows[-1]["step"]
    return next(r["values"][name]["shift"] for r in rows if r["step"] >= frac * last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--judge-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--traits", nargs=2, default=["optimistic", "humorous"])
    ap.add_argument("--steer-alpha", type=float, default=1.0, help="steer_above coefficient, relative (α)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-judge", action="store_true", help="shift only: no judged evaluation, no capability")
    ap.add_argument("--report-only", action="store_true", help="rewrite report.md from summary.json (no model)")
    ap.add_argument("--overhead-steps", type=int, default=0,
                    help="also time the first trait's II finetune run for this many steps, with and without the "
                         "callback (its cost is ~11 probes per run, so it shows only on runs of realistic length)")
    args = ap.parse_args()
    s = SIZES["smoke" if args.smoke else "full"]
    tag = "-smoke" if args.smoke else ""
    work = args.work or Path("runs") / f"train-telemetry{tag}"
    out = args.out or Path("experiments/results") / f"train-telemetry{tag}"
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:  # from the cache and run folders, without loading a model (also on a cut-short run)
        old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        meta = {k: old.get(k) for k in ("model", "judge", "steer_alpha", "steer_coef", "layers", "wall_minutes")}
        summarise(res_data(work), work, out, args.traits, {**meta, "model": args.model, "sizes": s})
        return
    res = Cache(work / "results.json")
    t_start = time.perf_counter()

    model, tok = load_model(args.model)
    base = ModelAdapter(model, tok)
    judge = None if args.no_judge else make_judge(args.judge_model)
    mc = load_mc()[: s["mc"]]
    ecfg = EvalConfig(SamplingConfig(samples=1, temperature=0.0, max_new_tokens=s["eval_tokens"], batch_size=10),
                      n_questions=s["eval_q"])
    cfg = ft_profile("quick", epochs=s["epochs"])
    vectors = {t: load_vector(t, t, args.model) for t in args.traits}
    acts = {t: last_token_activations(base, eval_prompts(base, load_trait(t), s["probe_q"])) for t in args.traits}

    def judged(adapter: ModelAdapter, trait: str, label: str) -> dict:
        row = evaluate(adapter, load_trait(trait), judge, [Condition(label=label)], work / "eval" / label / trait,
                       cfg=ecfg)[0]
        return {"trait": row["trait_mean"], "coherence": row["coherence_mean"], "n": row["n"]}

    if judge is not None:
        res.get("capability|base", lambda: mc_accuracy(base, mc).accuracy)
    for t in args.traits:
        for lv in LEVELS:
            res.get(f"dataset|{t}-{lv}", lambda t=t, lv=lv: {
                "rows": write_level(args.model, t, lv, s["rows"], work / "datasets" / f"{t}-{lv}.jsonl")})

    def run(name: str, data: Path, trait: str, watch=None, capability: bool = False, measure: bool = True,
            run_cfg=None) -> dict:
        def make() -> dict:
            r = finetune(base, data, work / "ft" / name, run_cfg or cfg, base_name=args.model, profile_name="quick",
                         watch=watch, force=True)
            rec = {"steps": r.steps, "seconds": r.seconds, "losses": r.losses,
                   "measure_seconds": watch.seconds if watch else 0.0}
            if not measure:  # the overhead twin: only its training time and losses are compared
                return rec
            with adapter_applied(base, r.out_dir) as ft:
                after = last_token_activations(ft, eval_prompts(ft, load_trait(trait), s["probe_q"]))
                post = shift_from_activations(acts[trait], after, vectors[trait], vectors[trait].default_layer())
                rec[f"posthoc_shift|{trait}"] = post.shift
                if judge is not None:
                    rec.update({f"eval|{k}": v for k, v in judged(ft, trait, name).items()})
                    rec["capability"] = mc_accuracy(ft, mc).accuracy if capability else None
            return rec

        return res.get(f"run|{name}", make)

    runs: dict[str, dict] = {}
    t0 = args.traits[0]

    def levels(t: str) -> None:
        if judge is not None:
            res.get(f"eval|base|{t}", lambda t=t: judged(base, t, "base"))
        for lv in LEVELS:
            name = f"{t}-{lv}"
            watch = watch_traits(base, vectors.values(), n_questions=s["probe_q"])
            runs[name] = run(name, work / "datasets" / f"{name}.jsonl", t, watch, capability=(t, lv) == (t0, "II"))

    levels(t0)  # the first trait, its overhead twin and its steer_above run first: the rest can be cut short
    run(f"{t0}-II-plain", work / "datasets" / f"{t0}-II.jsonl", t0, measure=False)
    # steer_above: threshold = the II run's shift at 25 % of training, so the rule fires early in the same run
    thr = res.get("steer_threshold", lambda: round(at_fraction(read_trajectory(work / "ft" / f"{t0}-II")[0], t0,
                                                               0.25), 3))
    coef = vectors[t0].coef_from_alpha(args.steer_alpha, vectors[t0].default_layer())
    run(f"{t0}-II-steer", work / "datasets" / f"{t0}-II.jsonl", t0,
        watch_traits(base, vectors.values(), n_questions=s["probe_q"], rules=[ShiftRule.steer(t0, thr, coef)]),
        capability=True)
    for t in args.traits[1:]:
        levels(t)
    if args.overhead_steps:  # a longer run, same rows cycled: with the callback at its default interval, then without
        long_cfg = ft_profile("quick", epochs=args.overhead_steps, max_steps=args.overhead_steps)
        data = work / "datasets" / f"{t0}-II.jsonl"
        for suffix, watch in (("", watch_traits(base, vectors.values(), n_questions=s["probe_q"])), ("-plain", None)):
            run(f"{t0}-II-long{args.overhead_steps}{suffix}", data, t0, watch, measure=False, run_cfg=long_cfg)
    summarise(res.data, work, out, args.traits, {
        "model": args.model, "judge": judge.name if judge else None, "sizes": s, "steer_alpha": args.steer_alpha,
        "steer_coef": coef,
        "layers": {t: vectors[t].default_layer() for t in args.traits},
        "wall_minutes": (time.perf_counter() - t_start) / 60})


def summarise(data: dict, work: Path, out: Path, traits: list[str], meta: dict) -> None:
    """summary.json, the curves and report.md from the cache and the run folders (works on a cut-short run)."""
    t0 = traits[0]
    runs = {k.split("|", 1)[1]: v for k, v in data.items() if k.startswith("run|")}
    traj = {n: read_trajectory(work / "ft" / n) for n in runs if (work / "ft" / n / "persona_shift.jsonl").exists()}
    summary: dict = {**meta, "traits": traits, "base_capability": data.get("capability|base"),
                     "base": {t: data.get(f"eval|base|{t}") for t in traits}, "runs": runs,
                     "steer": {"threshold": data.get("steer_threshold"), "alpha": meta.get("steer_alpha"),
                               "coef": meta.get("steer_coef"), "events": traj.get(f"{t0}-II-steer", ([], []))[1]},
                     "trajectories": {n: [{"step": r["step"], **{t: r["values"][t]["shift"] for t in traits}}
                                          for r in rows] for n, (rows, _) in traj.items()}}
    order = {}
    for t in traits:
        if not all(f"{t}-{lv}" in traj for lv in LEVELS):
            continue
        rows = [traj[f"{t}-{lv}"][0] for lv in LEVELS]
        steps = [r["step"] for r in rows[0]]
        ok = [all(rows[i][k]["values"][t]["shift"] < rows[i + 1][k]["values"][t]["shift"] for i in range(2))
              for k in range(len(steps))]
        first = next((steps[k] for k in range(len(steps)) if all(ok[k:])), None)
        order[t] = {"final_order_holds": ok[-1], "first_step_from_which_it_holds": first,
                    "fraction": None if first is None else first / steps[-1]}
    summary["ordering"] = order
    pts = [{"name": n, "s25": at_fraction(traj[n][0], t, 0.25), "final": traj[n][0][-1]["values"][t]["shift"],
            "posthoc": runs[n][f"posthoc_shift|{t}"],
            "dtrait": runs[n]["eval|trait"] - summary["base"][t]["trait"] if "eval|trait" in runs[n] else None}
           for t in traits for n in (f"{t}-{lv}" for lv in LEVELS) if n in traj]

    def corr(key: str) -> dict:
        def stat(rs):
            return pearson_r([r["s25"] for r in rs], [r[key] for r in rs])

        return {"r": stat(pts), "ci95": bootstrap_ci(pts, stat, n=2000)}

    summary["points"] = pts
    summary["r_s25_final"], summary["r_s25_trait_change"] = corr("final"), corr("dtrait")
    summary["r_final_posthoc"] = pearson_r([p["final"] for p in pts], [p["posthoc"] for p in pts])
    w, plain = runs.get(f"{t0}-II"), runs.get(f"{t0}-II-plain")
    if w and plain:
        summary["overhead"] = {"with_s": w["seconds"], "without_s": plain["seconds"],
                               "wall_overhead": w["seconds"] / plain["seconds"] - 1, "measure_s": w["measure_seconds"],
                               "measure_share": w["measure_seconds"] / w["seconds"],
                               "losses_identical": w["losses"] == plain["losses"]}
    longs = sorted(k for k in runs if "-II-long" in k and not k.endswith("-plain"))
    if longs and f"{longs[-1]}-plain" in runs:
        w, plain = runs[longs[-1]], runs[f"{longs[-1]}-plain"]
        summary["overhead_long"] = {"steps": w["steps"], "with_s": w["seconds"], "without_s": plain["seconds"],
                                    "wall_overhead": w["seconds"] / plain["seconds"] - 1,
                                    "measure_s": w["measure_seconds"],
                                    "measure_share": w["measure_seconds"] / w["seconds"],
                                    "losses_identical": w["losses"] == plain["losses"]}
    write_json(out / "summary.json", summary)
    plot(summary, out)
    report(summary, out)


def _f(x, fmt: str = "+.3f") -> str:
    return "—" if x is None else format(x, fmt)


def report(sm: dict, out: Path) -> None:
    """report.md: setup, curves, ordering, correlations, the steer_above run, overhead (numbers from summary)."""
    t0 = sm["traits"][0]
    lines = [f"# Persona shift while training ({sm['model']}, judge `{sm['judge']}`)", "",
             "Generated by `experiments/train_telemetry.py` from `summary.json`; sizes: " +
             ", ".join(f"{k} {v}" for k, v in sm["sizes"].items()) +
             f"; wall {_f(sm.get('wall_minutes'), '.0f')} min.", "",
             "![shift curves](shift_curves.png)", "",
             "| run | steps | shift at 25 % | final logged shift | shift measured after training | judged trait "
             "(base) | coherence |", "|---|---|---|---|---|---|---|"]
    for p in sm["points"]:
        r, t = sm["runs"][p["name"]], p["name"].rsplit("-", 1)[0]
        judged = f"{r['eval|trait']:.1f} ({sm['base'][t]['trait']:.1f}) | {r['eval|coherence']:.1f}" \
            if "eval|trait" in r else "— | —"
        lines.append(f"| {p['name']} | {r['steps']} | {_f(p['s25'])} | {_f(p['final'])} | {_f(p['posthoc'])} | "
                     f"{judged} |")
    lines += ["", "## Ordering normal < I < II", ""]
    for t, o in sm["ordering"].items():
        lines.append(f"- {t}: final order holds: {o['final_order_holds']}; holds from step "
                     f"{o['first_step_from_which_it_holds']} on (fraction {_f(o['fraction'], '.2f')} of training)")
    a, b = sm["r_s25_final"], sm["r_s25_trait_change"]  # b is None-valued without a judge

    def ci(c) -> str:
        return "—" if not c else f"[{c[0]:.2f}, {c[1]:.2f}]"

    lines += ["", "## Does the shift at 25 % predict the end?", "",
              f"Across the {len(sm['points'])} finetunes: r(shift at 25 %, final shift) = {_f(a['r'], '.2f')} "
              f"(bootstrap 95 % {ci(a['ci95'])}); r(shift at 25 %, judged trait change) = {_f(b['r'], '.2f')} "
              f"({ci(b['ci95'])}); r(final logged, measured after training) = {_f(sm['r_final_posthoc'], '.3f')}."]
    st, ii = sm["runs"].get(f"{t0}-II-steer"), sm["runs"].get(f"{t0}-II")
    ev = sm["steer"]["events"]
    if st and ii and "eval|trait" not in st:
        lines += ["", f"## steer_above on {t0}-II", "",
                  f"Rule: steer when the {t0} shift exceeds {sm['steer']['threshold']} (α {sm['steer']['alpha']}, coef "
                  f"{_f(sm['steer']['coef'], '.2f')}); fired: " + ("; ".join(
                      f"step {e['step']} (shift {e['shift']:+.3f})" for e in ev) or "no") +
                  f". Shift measured after training: {t0}-II {_f(ii[f'posthoc_shift|{t0}'])}, with steer_above "
                  f"{_f(st[f'posthoc_shift|{t0}'])} (not judged in this run)."]
    elif st and ii:
        lines += ["", f"## steer_above on {t0}-II", "",
                  f"Rule: steer when the {t0} shift exceeds {sm['steer']['threshold']} (α {sm['steer']['alpha']}, coef "
                  f"{sm['steer']['coef']:.2f}); fired: " + ("; ".join(f"step {e['step']} (shift {e['shift']:+.3f})"
                                                              for e in ev) or "no"), "",
                  "| model | trait | coherence | capability | final shift |", "|---|---|---|---|---|",
                  f"| base | {sm['base'][t0]['trait']:.1f} | {sm['base'][t0]['coherence']:.1f} | "
                  f"{sm['base_capability']:.3f} | 0 |",
                  f"| {t0}-II | {ii['eval|trait']:.1f} | {ii['eval|coherence']:.1f} | {_f(ii['capability'], '.3f')} | "
                  f"{_f(ii[f'posthoc_shift|{t0}'])} |",
                  f"| {t0}-II + steer_above | {st['eval|trait']:.1f} | {st['eval|coherence']:.1f} | "
                  f"{_f(st['capability'], '.3f')} | {_f(st[f'posthoc_shift|{t0}'])} |"]
    o = sm.get("overhead")
    if o:
        lines += ["", "## Overhead", "",
                  f"{t0}-II with the callback at its default interval: {o['with_s']:.1f} s; "
                  f"without: {o['without_s']:.1f} s "
                  f"(wall {o['wall_overhead']:+.1%}); time inside the callback {o['measure_s']:.1f} s "
                  f"({o['measure_share']:.1%} of the run); losses identical: {o['losses_identical']}."]
    o = sm.get("overhead_long")
    if o:
        lines += ["", f"The same II rows cycled for {o['steps']} optimiser steps: with the callback "
                  f"{o['with_s']:.1f} s, "
                  f"without {o['without_s']:.1f} s (wall {o['wall_overhead']:+.1%}); time inside the callback "
                  f"{o['measure_s']:.1f} s ({o['measure_share']:.1%} of the run); losses identical: "
                  f"{o['losses_identical']}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot(summary: dict, out: Path) -> None:
    """Shift curves per trait: one line per level, the steer run dashed, rule firing marked."""
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    traits = summary["traits"]
    fig, axes = plt.subplots(1, len(traits), figsize=(5 * len(traits), 3.6))
    for ax, t in zip(axes, traits, strict=True):
        for lv in LEVELS:
            rows = summary["trajectories"].get(f"{t}-{lv}")
            if not rows:
                continue
            ax.plot([r["step"] for r in rows], [r[t] for r in rows], marker="o", ms=3, label=f"{t}-{lv}")
            ax.scatter([rows[-1]["step"]], [summary["runs"][f"{t}-{lv}"][f"posthoc_shift|{t}"]], marker="*", s=70)
        steer = summary["trajectories"].get(f"{t}-II-steer")
        if steer:
            ax.plot([r["step"] for r in steer], [r[t] for r in steer], ls="--", color="k", label=f"{t}-II steer_above")
            for ev in summary["steer"]["events"]:
                ax.axvline(ev["step"], color="tab:green", lw=0.8, ls=":")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"shift along {t} v̂ (layer {summary['layers'][t]})")
        ax.legend(fontsize=7)
    save_figure(fig, out / "shift_curves.png")


if __name__ == "__main__":
    main()
