"""Data screening on the default model: does ΔP rank datasets and samples by how much trait they carry?

    flock /tmp/personascope-cpu.lock .venv/bin/python experiments/screen_experiment.py

Builds three small chat datasets from questions_pool.json (not the trait's own questions): *normal*
(answers the model gives under the trait's neg instruction), *I* (half the rows answered under the
pos instruction instead) and *II* (all rows under the pos instruction); the instruction itself is
not part of the rows. Screens each with both methods (generate, last-token), and a mixed file
(every question once per side, labelled) with both methods and with the LLM-judge filter, flagging
at the 95th percentile of ΔP on the normal set. A positive control adds rows the model wrote while
steered along the vector (+α): it checks the machinery end to end, not the method (those rows were
pushed along the very direction ΔP measures). Writes experiments/results/screen/report.md and PNGs.
Everything is cached in that folder, so a rerun only redoes what is missing.
"""

from __future__ import annotations

import json
import random
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from personascope.adapter import ModelAdapter
from personascope.extract import extract_vector, profile
from personascope.generate import SamplingConfig, generate_batch, run_generation
from personascope.judge import load_local_judge
from personascope.models import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL, load_model
from personascope.plots import plt, save_figure
from personascope.screen_run import ScreenConfig, screen_dataset
from personascope.stats import auroc as auc
from personascope.steer import Steerer
from personascope.store import JsonlStore, write_json
from personascope.traits import load_trait
from personascope.vectors import PersonaVector, VectorMismatchError, load_vector

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "screen"
TRAIT = "optimistic"
N_ROWS = 24
MAX_NEW = 64  # dataset answers and the model's own answers
METHODS = ("generate", "last-token")
DATASETS = ("normal", "I", "II")
PERCENTILE = 95.0
CONTROL_ALPHA = 0.5  # steering strength of the positive-control rows (optimistic steers at ±0.5)


def find_vector(adapter: ModelAdapter, get_judge) -> tuple[PersonaVector, str]:
    """A vector from an earlier `personascope extract` / demo run, else extract one (quick, 6 questions)."""
    for path in (ROOT / "runs" / "demo" / "extract" / "vector.safetensors",
                 ROOT / "runs" / f"{TRAIT}-{DEFAULT_MODEL}" / "vector.safetensors",
                 OUT / "extract" / "vector.safetensors"):
        if path.exists():
            try:
                pv = load_vector(path)
                pv.check(adapter)
            except (ValueError, VectorMismatchError) as e:
                print(f"skipping {path}: {e}", file=sys.stderr)
                continue
            if pv.trait == TRAIT:
                return pv, str(path.relative_to(ROOT))
    pv = extract_vector(adapter, TRAIT, judge=get_judge(), config=profile("quick", n_questions=6),
                        run_dir=OUT / "extract")
    return pv, f"{(OUT / 'extract').relative_to(ROOT)}/vector.safetensors (extracted by this script)"


def pick_questions(n: int, seed: int = 0) -> list[str]:
    trait = load_trait(TRAIT)
    pool = json.loads((resources.files("personascope") / "data" / "questions_pool.json").read_text())
    banned = set(trait.eval_questions) | set(trait.extract_questions)
    return random.Random(seed).sample([q for q in pool if q not in banned], n)


def dataset_answers(adapter: ModelAdapter, questions: list[str]) -> dict[str, list[str]]:
    """The model's greedy answer to each question under the neg and under the pos instruction."""
    trait = load_trait(TRAIT)
    store = JsonlStore(OUT / "dataset_answers.jsonl", ("side", "question"))
    jobs = [{"side": side, "question": i, "question_text": q, "system": trait.system_prompt(side, i % 5)}
            for side in ("neg", "pos") for i, q in enumerate(questions)]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW, batch_size=8)
    run_generation(adapter, jobs, lambda j: adapter.prompt(j["question_text"], j["system"]),
                   lambda j: store.key(j) in store, store.append, cfg, "dataset answers")
    return {side: [store.get((side, i))["answer"] for i in range(len(questions))] for side in ("neg", "pos")}


def steered_answers(adapter: ModelAdapter, pv: PersonaVector, layer: int, questions: list[str]) -> list[str]:
    """Positive control: the model's greedy answers (no system prompt) steered at +CONTROL_ALPHA along v."""
    store = JsonlStore(OUT / "steered_answers.jsonl", ("question", "alpha", "layer"))
    todo = [i for i in range(len(questions)) if (i, CONTROL_ALPHA, layer) not in store]
    coef = pv.coef_from_alpha(CONTROL_ALPHA, layer)
    with Steerer(adapter).add(pv, layer, coef, "response"):
        for s in range(0, len(todo), 8):
            idx = todo[s : s + 8]
            outs = generate_batch(adapter, [adapter.prompt(questions[i]) for i in idx], MAX_NEW, temperature=0.0)
            store.append({"question": i, "alpha": CONTROL_ALPHA, "layer": layer, "coef": coef, "answer": a}
                         for i, a in zip(idx, outs, strict=True))
    return [store.get((i, CONTROL_ALPHA, layer))["answer"] for i in range(len(questions))]


def write_datasets(questions: list[str], answers: dict[str, list[str]]) -> dict[str, Path]:
    def row(i: int, side: str) -> dict:
        return {"messages": [{"role": "user", "content": questions[i]},
                             {"role": "assistant", "content": answers[side][i]}],
                "trait_row": side in ("pos", "steered"), "question_id": i}

    n = len(questions)
    sets = {"normal": [row(i, "neg") for i in range(n)],
            "I": [row(i, "pos" if i % 2 == 0 else "neg") for i in range(n)],
            "II": [row(i, "pos") for i in range(n)],
            "mixed": [row(i, s) for i in range(n) for s in ("neg", "pos")]}
    if "steered" in answers:
        sets["steered"] = [row(i, "steered") for i in range(n)]
        sets["mixed-control"] = [row(i, s) for i in range(n) for s in ("neg", "steered")]
    paths = {}
    for name, rows in sets.items():
        p = OUT / "data" / f"{name}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[name] = p
    return paths


def annotated(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "annotated.jsonl").read_text().splitlines()]


def precision_recall(flags: list[bool], labels: list[bool]) -> tuple[float, float]:
    tp = sum(f and y for f, y in zip(flags, labels, strict=True))
    return (tp / sum(flags) if sum(flags) else float("nan")), tp / max(sum(labels), 1)


def roc_points(scores: list[float], labels: list[bool]) -> tuple[list[float], list[float]]:
    order = np.argsort(-np.asarray(scores), kind="stable")
    y = np.asarray(labels)[order]
    tpr = np.concatenate([[0], np.cumsum(y) / max(y.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~y) / max((~y).sum(), 1)])
    return fpr.tolist(), tpr.tolist()


def main() -> None:
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(DEFAULT_MODEL)
    adapter = ModelAdapter(model, tok)
    judge_box: list = []

    def get_judge():
        if not judge_box:
            judge_box.append(load_local_judge(DEFAULT_JUDGE_MODEL))
        return judge_box[0]

    pv, vector_source = find_vector(adapter, get_judge)
    layer = pv.default_layer()
    questions = pick_questions(N_ROWS)
    t_data = time.perf_counter()
    answers = dataset_answers(adapter, questions)
    answers["steered"] = steered_answers(adapter, pv, layer, questions)
    t_data = time.perf_counter() - t_data
    paths = write_datasets(questions, answers)
    cache = OUT / "model_answers.jsonl"
    results: dict = {"datasets": {}, "mixed": {}, "timings": {"dataset_answers_s": t_data}}
    runs = OUT / "runs"
    for method in METHODS:
        cfg = ScreenConfig(method=method, max_new_tokens=MAX_NEW, batch_size=8)
        for ds in (*DATASETS, "steered"):
            t = time.perf_counter()
            r = screen(adapter, paths[ds], {TRAIT: pv}, method=method, out_dir=runs / method / ds,
                       config=cfg, answer_cache=cache)
            rep = r.traits[TRAIT]
            results["datasets"].setdefault(method, {})[ds] = {
                "mean": rep.mean, "ci": [rep.ci_low, rep.ci_high], "n": rep.n, "seconds": time.perf_counter() - t}
        judge = get_judge() if method == "generate" else None  # judge scores do not depend on the method
        for mixed, key in (("mixed", "mixed"), ("mixed-control", "control")):
            results.setdefault(key, {}).update(
                evaluate_mixed(adapter, pv, paths[mixed], paths["normal"], runs / method / mixed, cfg, cache, judge))
    results["timings"]["total_s"] = time.perf_counter() - t0
    meta = {"model": adapter.name, "device": str(adapter.device), "dtype": str(next(model.parameters()).dtype),
            "trait": TRAIT, "layer": layer, "vector": vector_source, "rows": N_ROWS,
            "kept_pairs": pv.metadata.get("kept_pairs", "?"), "total_pairs": pv.metadata.get("total_pairs", "?"),
            "max_new_tokens": MAX_NEW, "percentile": PERCENTILE, "questions": questions}
    if (OUT / "results.json").exists():  # a step reused from the cache keeps the time it took when it ran
        _keep_computed_times(results, json.loads((OUT / "results.json").read_text()))
    write_json(OUT / "results.json", {"meta": meta, **results})
    plot_datasets(results, OUT / "dataset_delta_p.png", layer)
    plot_roc(results["mixed"], OUT / "roc_mixed.png", "mixed file")
    plot_roc(results["control"], OUT / "roc_control.png", "positive control")
    write_report(meta, results, answers, questions, OUT / "report.md")
    print(f"report: {OUT / 'report.md'} ({results['timings']['total_s']:.0f} s)")


def _keep_computed_times(new: dict, old: dict) -> None:
    """Replace step times under 1 s (cache hits) by the earlier run's time for the same step."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(old.get(k), dict):
            _keep_computed_times(v, old[k])
        elif (k == "seconds" or k == "dataset_answers_s") and isinstance(v, float) and v < 1.0 and k in old:
            new[k] = old[k]


def screen(*args, **kw):
    """screen_dataset, starting a cached run over when its settings (vector, judge, data) have changed."""
    try:
        return screen_dataset(*args, **kw)
    except ValueError as e:
        if "other settings" not in str(e):
            raise
        print(f"{e} — starting it over", file=sys.stderr)
        return screen_dataset(*args, **kw, force=True)


def evaluate_mixed(adapter: ModelAdapter, pv: PersonaVector, path: Path, reference: Path, out: Path,
                   cfg: ScreenConfig, cache: Path, judge) -> dict:
    """Screen a labelled mixed file (flags at the 95th percentile of the reference); AUROC, precision, recall."""
    t = time.perf_counter()
    r = screen(adapter, path, {TRAIT: pv}, method=cfg.method, out_dir=out, config=cfg, answer_cache=cache,
               reference=reference, percentile=PERCENTILE, judge=judge)
    rows = annotated(out)
    labels = [row["trait_row"] for row in rows]
    ints = [int(y) for y in labels]
    dp = [row["screen"]["delta_p"][TRAIT] for row in rows]
    flags = [row["screen"]["flagged"][TRAIT] for row in rows]
    prec, rec = precision_recall(flags, labels)
    res = {cfg.method: {"auroc": auc(dp, ints), "threshold": r.traits[TRAIT].threshold, "flagged": sum(flags),
                        "precision": prec, "recall": rec, "seconds": time.perf_counter() - t, "scores": dp,
                        "labels": labels, "hist": str((out / f"hist_{TRAIT}.png").relative_to(OUT))}}
    if cfg.method == "last-token":  # the last prompt token's projection on its own (independent of the response)
        pl = [row["screen"]["proj_baseline"][TRAIT] for row in rows]
        res["prompt-last only"] = {"auroc": auc(pl, ints), "scores": pl, "labels": labels}
    if judge is not None:
        js = [row["screen"]["judge"][TRAIT] for row in rows]
        jflags = [row["screen"]["judge_flagged"][TRAIT] for row in rows]
        ok = [(s, y) for s, y in zip(js, ints, strict=True) if s is not None]
        jp, jr = precision_recall(jflags, labels)
        res["judge"] = {
            "auroc": auc([s for s, _ in ok], [y for _, y in ok]), "threshold": 50.0, "flagged": sum(jflags),
            "precision": jp, "recall": jr, "missing": len(js) - len(ok), "labels": labels,
            "scores": [s if s is not None else float("nan") for s in js],
            "mode": (judge.describe_mode("trait", load_trait(TRAIT)) if hasattr(judge, "describe_mode")
                     else judge.mode_for("trait")),
            "name": judge.name,
            "by_dataset": {ds: float(np.nanmean([np.nan if s is None else s for s, row in zip(js, rows, strict=True)
                                                 if _in_dataset(row, ds)])) for ds in DATASETS}}
    return res


def _in_dataset(row: dict, ds: str) -> bool:
    """Whether a mixed-file row is also a row of dataset `ds`."""
    i, pos = row["question_id"], row["trait_row"]
    return {"normal": not pos, "II": pos, "I": pos == (i % 2 == 0)}[ds]


def plot_datasets(results: dict, path: Path, layer: int) -> Path:
    fig, axes = plt.subplots(1, len(METHODS), figsize=(9, 3.6))
    for ax, method in zip(axes, METHODS, strict=True):
        d = results["datasets"][method]
        names = (*DATASETS, "steered")
        means = [d[ds]["mean"] for ds in names]
        err = np.array([[d[ds]["mean"] - d[ds]["ci"][0], d[ds]["ci"][1] - d[ds]["mean"]] for ds in names]).T
        ax.bar([*DATASETS, "steered\n(control)"], means, yerr=err, capsize=4,
               color=["tab:blue", "tab:purple", "tab:red", "tab:gray"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{method}", fontsize=10)
        ax.set_ylabel("dataset ΔP (mean, 95% CI)")
    fig.suptitle(f"{TRAIT}: dataset-level ΔP at layer {layer} ({N_ROWS} rows each)", fontsize=10)
    return save_figure(fig, path)


def plot_roc(mixed: dict, path: Path, what: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, r in mixed.items():
        pairs = [(s, y) for s, y in zip(r["scores"], r["labels"], strict=True) if not np.isnan(s)]
        fpr, tpr = roc_points([s for s, _ in pairs], [y for _, y in pairs])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {r['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="k", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"separating trait rows: {what} (n={len(r['labels'])})", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _f(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _auroc_table(m: dict) -> list[str]:
    lines = ["| filter | AUROC | threshold | flagged | precision | recall |", "|---|---|---|---|---|---|"]
    for name in ("generate", "last-token", "judge", "prompt-last only"):
        if name not in m:
            continue
        r = m[name]
        label = {"generate": "ΔP, generate", "last-token": "ΔP, last-token",
                 "judge": f"LLM judge ({r.get('name', '')}, {r.get('mode', '')})",
                 "prompt-last only": "last prompt token projection alone"}[name]
        lines.append(f"| {label} | {_f(r['auroc'], '.3f')} | {_f(r.get('threshold'), '.3f')} | "
                     f"{r.get('flagged', '—')} | {_f(r.get('precision'), '.2f')} | {_f(r.get('recall'), '.2f')} |")
    return lines


def write_report(meta: dict, results: dict, answers: dict, questions: list[str], path: Path) -> Path:
    d, m, c = results["datasets"], results["mixed"], results["control"]
    n = meta["rows"]
    lines = [
        "# Data screening with the projection difference ΔP",
        "",
        f"Model {meta['model']} ({meta['device']}, {meta['dtype']}), trait **{meta['trait']}**, "
        f"vector `{meta['vector']}` (built from {meta['kept_pairs']} kept pos/neg pairs of {meta['total_pairs']}), "
        f"layer {meta['layer']} (the vector's default layer). {n} questions drawn from questions_pool.json "
        f"(none of the trait's extraction or evaluation questions); every answer greedy, ≤ {meta['max_new_tokens']} "
        "new tokens. Produced by `experiments/screen_experiment.py`; the numbers are from its last run.",
        "",
        "Datasets (user question + assistant answer; the instruction that produced an answer is not in the row):",
        "",
        "- **normal**: the model's answers under the trait's *neg* instruction (system prompt). For *optimistic* "
        "the neg instruction asks for risks and downsides, so this set is meant to sit *below* the model's own "
        "answers on the trait axis.",
        f"- **I**: even-numbered questions answered under the *pos* instruction, odd ones as in normal "
        f"({(n + 1) // 2} + {n // 2}).",
        "- **II**: every answer under the *pos* instruction.",
        f"- **mixed** (per-sample AUROC): all {2 * n} rows of normal and II, each question once per side, labelled.",
        f"- **steered** (positive control): the model's answers without a system prompt while steered along the "
        f"vector at α = +{CONTROL_ALPHA} (response positions); **mixed-control** = normal + steered.",
        "",
        "## Dataset-level ΔP (mean, 95% bootstrap CI)",
        "",
        "| method | normal | I | II | rises normal < I < II | control: steered |",
        "|---|---|---|---|---|---|",
    ]

    def cell(method: str, ds: str) -> str:
        x = d[method][ds]
        return f"{_f(x['mean'], '+.3f')} [{_f(x['ci'][0], '+.3f')}, {_f(x['ci'][1], '+.3f')}]"

    for method in METHODS:
        ok = d[method]["normal"]["mean"] < d[method]["I"]["mean"] < d[method]["II"]["mean"]
        lines.append(f"| {method} | " + " | ".join(cell(method, ds) for ds in DATASETS)
                     + f" | {'yes' if ok else 'no'} | {cell(method, 'steered')} |")
    if "judge" in m:
        bd = m["judge"]["by_dataset"]
        steered = np.nanmean([s for s, y in zip(c["judge"]["scores"], c["judge"]["labels"], strict=True) if y])
        lines.append(f"| judge score (mean 0–100) | {_f(bd['normal'], '.1f')} | {_f(bd['I'], '.1f')} | "
                     f"{_f(bd['II'], '.1f')} | {'yes' if bd['normal'] < bd['I'] < bd['II'] else 'no'} | "
                     f"{_f(float(steered), '.1f')} |")
    lines += [
        "",
        "![dataset ΔP](dataset_delta_p.png)",
        "",
        "ΔP of the two methods is on different scales (generate: response average minus the model's own "
        "response average; last-token: response average minus the last prompt token), so compare within a "
        "row only.",
        "",
        f"## Per-sample separation in the mixed file ({2 * n} rows, half trait rows)",
        "",
        f"Flags: ΔP above the {meta['percentile']:g}th percentile of ΔP on the normal set (the paper's rule, with "
        "normal as the clean reference); judge: trait score ≥ 50.",
        "",
        *_auroc_table(m),
        "",
        "![ROC](roc_mixed.png)",
        "",
        "The last row is the literal reading of \"project the last prompt token\": it does not depend on the "
        "dataset's response at all, so it cannot separate two answers to the same question (each question "
        "appears once per side here); that is why `--method last-token` subtracts it from the response "
        "average instead.",
        "",
        f"Histograms of ΔP in the mixed file with the threshold: [generate]({m['generate']['hist']}), "
        f"[last-token]({m['last-token']['hist']}).",
        "",
        f"## Positive control: normal vs steered rows ({2 * n} rows)",
        "",
        "The steered rows were pushed along the very direction ΔP projects on, so this checks that the pipeline "
        "(rendering, generation, span reduction, projection, thresholds) responds end to end on the real "
        "model; it is not evidence that ΔP finds naturally occurring trait data.",
        "",
        *_auroc_table(c),
        "",
        "![ROC control](roc_control.png)",
        "",
        "## Timings (CPU, 2 cores shared with other work)",
        "",
        "Each step's time is from the run that computed it (a rerun reuses finished steps from the cache).",
        "",
        f"- dataset answers ({3 * n} generations, {n} of them steered): "
        f"{results['timings']['dataset_answers_s']:.0f} s",
    ]
    for method in METHODS:
        secs = sum(d[method][ds]["seconds"] for ds in (*DATASETS, "steered"))
        lines.append(f"- {method}: normal + I + II + steered {secs:.0f} s, mixed {m[method]['seconds']:.0f} s, "
                     f"mixed-control {c[method]['seconds']:.0f} s"
                     + (" (the mixed files include judging every row)" if method == "generate" and "judge" in m
                        else ""))
    lines += [f"- whole script, last run: {results['timings']['total_s']:.0f} s", "",
              "## Example rows", ""]
    for i in range(3):
        lines += [f"**Q{i}: {questions[i]}**", ""]
        lines += [f"- {side}: {_cell(answers[side][i][:300])}" for side in ("neg", "pos", "steered")]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _cell(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
