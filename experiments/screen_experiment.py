"""Data screening on the default model: does ΔP rank datasets and samples by how much trait they carry?

    flock /tmp/personascope-cpu.lock .venv/bin/python experiments/screen_experiment.py

Builds three small chat datasets from questions_pool.json (not the trait's own questions): *normal*
(answers the model gives under the trait's neg instruction), *I* (half the rows answered under the
pos instruction instead) and *II* (all rows under the pos instruction); the instruction itself is
not part of the rows. Screens each with both methods (generate, last-token), and a mixed file
(every question once per side, labelled) with both methods and with the LLM-judge filter, flagging
at the 95th percentile of ΔP on the normal set. Writes experiments/results/screen/report.md and
PNGs. Everything is cached in that folder, so a rerun only redoes what is missing.
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
from personascope.generate import SamplingConfig, run_generation
from personascope.judge import load_local_judge
from personascope.judge_eval import auc
from personascope.models import DEFAULT_JUDGE_MODEL, DEFAULT_MODEL, load_model
from personascope.plots import _save, plt
from personascope.screen import ScreenConfig, screen_dataset
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


def write_datasets(questions: list[str], answers: dict[str, list[str]]) -> dict[str, Path]:
    def row(i: int, side: str) -> dict:
        return {"messages": [{"role": "user", "content": questions[i]},
                             {"role": "assistant", "content": answers[side][i]}],
                "trait_row": side == "pos", "question_id": i}

    n = len(questions)
    sets = {"normal": [row(i, "neg") for i in range(n)],
            "I": [row(i, "pos" if i % 2 == 0 else "neg") for i in range(n)],
            "II": [row(i, "pos") for i in range(n)],
            "mixed": [row(i, s) for i in range(n) for s in ("neg", "pos")]}
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
    t_data = time.perf_counter() - t_data
    paths = write_datasets(questions, answers)
    cache = OUT / "model_answers.jsonl"
    results: dict = {"datasets": {}, "mixed": {}, "timings": {"dataset_answers_s": t_data}}
    runs = OUT / "runs"
    for method in METHODS:
        cfg = ScreenConfig(method=method, max_new_tokens=MAX_NEW, batch_size=8)
        for ds in DATASETS:
            t = time.perf_counter()
            r = screen_dataset(adapter, paths[ds], {TRAIT: pv}, method=method, out_dir=runs / method / ds,
                               config=cfg, answer_cache=cache, quiet=True)
            rep = r.traits[TRAIT]
            results["datasets"].setdefault(method, {})[ds] = {
                "mean": rep.mean, "ci": [rep.ci_low, rep.ci_high], "n": rep.n, "seconds": time.perf_counter() - t}
        t = time.perf_counter()
        judge = get_judge() if method == "generate" else None  # judge scores do not depend on the method
        r = screen_dataset(adapter, paths["mixed"], {TRAIT: pv}, method=method, out_dir=runs / method / "mixed",
                           config=cfg, answer_cache=cache, reference=paths["normal"], percentile=PERCENTILE,
                           judge=judge, quiet=False)
        rows = annotated(runs / method / "mixed")
        labels = [row["trait_row"] for row in rows]
        dp = [row["screen"]["delta_p"][TRAIT] for row in rows]
        flags = [row["screen"]["flagged"][TRAIT] for row in rows]
        prec, rec = precision_recall(flags, labels)
        results["mixed"][method] = {
            "auroc": auc(dp, [int(y) for y in labels]), "threshold": r.traits[TRAIT].threshold,
            "flagged": sum(flags), "precision": prec, "recall": rec, "seconds": time.perf_counter() - t,
            "scores": dp, "labels": labels,
            "hist": str((runs / method / "mixed" / f"hist_{TRAIT}.png").relative_to(OUT))}
        if method == "last-token":  # the last prompt token's projection on its own (independent of the response)
            pl = [row["screen"]["proj_baseline"][TRAIT] for row in rows]
            results["mixed"]["prompt-last only"] = {"auroc": auc(pl, [int(y) for y in labels]), "scores": pl,
                                                    "labels": labels}
        if judge is not None:
            js = [row["screen"]["judge"][TRAIT] for row in rows]
            jflags = [row["screen"]["judge_flagged"][TRAIT] for row in rows]
            ok = [(s, y) for s, y in zip(js, labels, strict=True) if s is not None]
            jp, jr = precision_recall(jflags, labels)
            results["mixed"]["judge"] = {
                "auroc": auc([s for s, _ in ok], [int(y) for _, y in ok]), "threshold": 50.0,
                "flagged": sum(jflags), "precision": jp, "recall": jr, "missing": len(js) - len(ok),
                "scores": [s if s is not None else float("nan") for s in js], "labels": labels,
                "mode": judge.mode_for("trait"), "name": judge.name,
                "by_dataset": {ds: float(np.nanmean([s if s is not None else np.nan for s, row in zip(js, rows,
                               strict=True) if _in_dataset(row, ds)])) for ds in DATASETS}}
    results["timings"]["total_s"] = time.perf_counter() - t0
    meta = {"model": adapter.name, "device": str(adapter.device), "dtype": str(next(model.parameters()).dtype),
            "trait": TRAIT, "layer": layer, "vector": vector_source, "rows": N_ROWS,
            "max_new_tokens": MAX_NEW, "percentile": PERCENTILE, "questions": questions}
    write_json(OUT / "results.json", {"meta": meta, **results})
    plot_datasets(results, OUT / "dataset_delta_p.png", layer)
    plot_roc(results, OUT / "roc_mixed.png")
    write_report(meta, results, answers, questions, OUT / "report.md")
    print(f"report: {OUT / 'report.md'} ({results['timings']['total_s']:.0f} s)")


def _in_dataset(row: dict, ds: str) -> bool:
    """Whether a mixed-file row is also a row of dataset `ds`."""
    i, pos = row["question_id"], row["trait_row"]
    return {"normal": not pos, "II": pos, "I": pos == (i % 2 == 0)}[ds]


def plot_datasets(results: dict, path: Path, layer: int) -> Path:
    fig, axes = plt.subplots(1, len(METHODS), figsize=(9, 3.6))
    for ax, method in zip(axes, METHODS, strict=True):
        d = results["datasets"][method]
        means = [d[ds]["mean"] for ds in DATASETS]
        err = np.array([[d[ds]["mean"] - d[ds]["ci"][0], d[ds]["ci"][1] - d[ds]["mean"]] for ds in DATASETS]).T
        ax.bar(DATASETS, means, yerr=err, capsize=4, color=["tab:blue", "tab:purple", "tab:red"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{method}", fontsize=10)
        ax.set_ylabel("dataset ΔP (mean, 95% CI)")
    fig.suptitle(f"{TRAIT}: dataset-level ΔP at layer {layer} ({N_ROWS} rows each)", fontsize=10)
    return _save(fig, path)


def plot_roc(results: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, r in results["mixed"].items():
        pairs = [(s, y) for s, y in zip(r["scores"], r["labels"], strict=True) if not np.isnan(s)]
        fpr, tpr = roc_points([s for s, _ in pairs], [y for _, y in pairs])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {r['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="k", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"separating trait rows in the mixed file (n={len(r['labels'])})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _f(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def write_report(meta: dict, results: dict, answers: dict, questions: list[str], path: Path) -> Path:
    d, m = results["datasets"], results["mixed"]
    gen_order = d["generate"]["normal"]["mean"] < d["generate"]["I"]["mean"] < d["generate"]["II"]["mean"]
    lt_order = d["last-token"]["normal"]["mean"] < d["last-token"]["I"]["mean"] < d["last-token"]["II"]["mean"]
    lines = [
        "# Data screening with the projection difference ΔP",
        "",
        f"Model {meta['model']} ({meta['device']}, {meta['dtype']}), trait **{meta['trait']}**, "
        f"vector `{meta['vector']}`, layer "
        f"{meta['layer']} (the vector's default layer). {meta['rows']} questions drawn from questions_pool.json "
        f"(none of the trait's extraction or evaluation questions); every answer greedy, ≤ {meta['max_new_tokens']} "
        "new tokens. Produced by `experiments/screen_experiment.py`; numbers below are from its last run.",
        "",
        "Datasets (user question + assistant answer, no system prompt in the rows):",
        "",
        "- **normal**: the model's answers under the trait's *neg* instruction. For *optimistic* the neg "
        "instruction asks for the risks and downsides, so this set is pessimistic rather than neutral: it "
        "sits *below* the model's own answers on the trait axis.",
        f"- **I**: even-numbered questions answered under the *pos* instruction, odd ones as in normal "
        f"({(meta['rows'] + 1) // 2} + {meta['rows'] // 2}).",
        "- **II**: every answer under the *pos* instruction.",
        f"- **mixed** (for per-sample AUROC): all {2 * meta['rows']} rows, each question once per side, labelled.",
        "",
        "## Dataset-level ΔP (mean, 95% bootstrap CI)",
        "",
        "| method | normal | I | II | rises normal < I < II |",
        "|---|---|---|---|---|",
    ]
    for method, ok in (("generate", gen_order), ("last-token", lt_order)):
        cells = [f"{_f(d[method][ds]['mean'], '+.3f')} [{_f(d[method][ds]['ci'][0], '+.3f')}, "
                 f"{_f(d[method][ds]['ci'][1], '+.3f')}]" for ds in DATASETS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
    if "judge" in m:
        bd = m["judge"]["by_dataset"]
        lines.append(f"| judge score (mean 0–100) | {_f(bd['normal'], '.1f')} | {_f(bd['I'], '.1f')} | "
                     f"{_f(bd['II'], '.1f')} | {'yes' if bd['normal'] < bd['I'] < bd['II'] else 'no'} |")
    lines += [
        "",
        "![dataset ΔP](dataset_delta_p.png)",
        "",
        "ΔP of the two methods is on different scales (generate: response average minus the model's own "
        "response average; last-token: response average minus the last prompt token), so compare within a "
        "row only.",
        "",
        f"## Per-sample separation in the mixed file ({2 * meta['rows']} rows, half trait rows)",
        "",
        f"Flags: ΔP above the {meta['percentile']:g}th percentile of ΔP on the normal set (the paper's rule, with "
        "normal as the clean reference); judge: trait score ≥ 50.",
        "",
        "| filter | AUROC | threshold | flagged | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("generate", "last-token", "judge", "prompt-last only"):
        if name not in m:
            continue
        r = m[name]
        label = {"generate": "ΔP, generate", "last-token": "ΔP, last-token",
                 "judge": f"LLM judge ({r.get('name', '')}, {r.get('mode', '')})",
                 "prompt-last only": "last prompt token projection alone"}[name]
        lines.append(f"| {label} | {_f(r['auroc'], '.3f')} | {_f(r.get('threshold'), '.3f')} | "
                     f"{r.get('flagged', '—')} | {_f(r.get('precision'), '.2f')} | {_f(r.get('recall'), '.2f')} |")
    lines += [
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
        "## Timings (CPU, 2 cores shared with other work)",
        "",
        f"- dataset answers ({2 * meta['rows']} generations): {results['timings']['dataset_answers_s']:.0f} s",
    ]
    for method in METHODS:
        secs = sum(d[method][ds]["seconds"] for ds in DATASETS)
        lines.append(f"- {method}: normal + I + II {secs:.0f} s, mixed {m[method]['seconds']:.0f} s"
                     + (" (includes judging every row)" if method == "generate" and "judge" in m else ""))
    lines += [f"- whole script: {results['timings']['total_s']:.0f} s (a rerun reuses every cached step)", "",
              "## Example rows", ""]
    for i in range(2):
        lines += [f"**Q{i}: {questions[i]}**", "", f"- neg: {answers['neg'][i][:300]}",
                  f"- pos: {answers['pos'][i][:300]}", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
