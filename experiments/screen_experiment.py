"""Data screening, rerun: does the projection difference ΔP find the training rows that express a trait?

    python experiments/screen_experiment.py --trait optimistic            # ~40 min on 2 CPU cores with vLLM

Datasets are the model's own answers to questions of the built-in pool (none of the trait's own questions),
built by `make_dataset` with answers that end at the end-of-turn token (cut answers are resampled):
*normal* = answers with no system prompt (how the model answers anyway), *II* = answers under the trait's
eliciting instruction that the judge scores ≥ 50 (the instruction is not part of the row), *I* = half of each.
Every row carries its judged trait score (the label judge, by default the probe judge on the 0.5B), so the
per-sample question is "does ΔP rank the rows that *express* the trait (judged ≥ 50, refusals left out) above
the rest?", over all normal + II rows, for ΔP of both methods and for an LLM-judge filter (another judge,
scoring each row once). Dataset ΔP (normal < I < II?) comes with bootstrap 95 % intervals. A positive control
adds rows the model wrote while steered along the vector: it checks the machinery end to end, not the method.

Everything is cached under --work, so a rerun only does what is missing; the report and PNGs go to --out.
`--engine vllm` (or auto, when vLLM is installed) generates the rows, the model's own answers and the
steered control on vLLM; ΔP itself always runs on the HF model. `--judge-url` takes an API judge for the
labels; `--model` any local path or built-in name (`--device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from personascope.finetuning import DatasetConfig, chat_row, ended, make_dataset, write_chat_jsonl
from personascope.judges import ScoreCache, judge_answers, make_judge
from personascope.model import (
    DEFAULT_JUDGE_MODEL,
    DEFAULT_MODEL,
    ModelAdapter,
    SamplingConfig,
    load_model,
    run_generation,
)
from personascope.runtime.engines import make_engine, work_tokens
from personascope.screen import ScreenConfig, screen_dataset
from personascope.steering import Steerer, SteeringSpec
from personascope.traits import load_trait
from personascope.util import JsonlStore, auroc, bootstrap_ci, format_ci, save_figure, spearman, write_json
from personascope.vectors import PersonaVector, VectorMismatchError, load_vector

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("generate", "last-token")
DATASETS = ("normal", "I", "II")
LABEL_AT = 50.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trait", default="optimistic")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default=None)
    p.add_argument("--vector", default=None, help="vector file (default: the package's ready-made one for --model)")
    p.add_argument("--judge-model", default="qwen2.5-coder-0.5b", help="the label judge (probe weights if shipped)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for the label judge")
    p.add_argument("--filter-judge-model", default="qwen2.5-coder-0.5b",
                   help="the LLM-judge filter compared with ΔP: a local model judging in its prompted mode "
                        f"(auto), not the label judge's probe (e.g. {DEFAULT_JUDGE_MODEL}; 'none' skips it)")
    p.add_argument("--rows", type=int, default=240,
                   help="questions per dataset (rows that fail the filters 3 times are dropped: aim above 200)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answers longer than this are resampled")
    p.add_argument("--question-suffix", default=" Answer in a few sentences.",
                   help="appended to every question (part of the rows) so that answers end")
    p.add_argument("--questions", default="pool", choices=("pool", "extraction"),
                   help="pool: the built-in everyday questions; extraction: the trait's own extraction questions, "
                        "cycled to --rows (room for the trait; the rows repeat questions)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--own-tokens", type=int, default=64,
                   help="length of the model's own greedy answers that method 'generate' subtracts")
    p.add_argument("--control-rows", type=int, default=40, help="steered positive-control rows")
    p.add_argument("--control-alpha", type=float, default=0.5,
                   help="steering strength of the control rows (at α 1, all positions, the 0.5B's answers looped)")
    p.add_argument("--trait-threshold", type=float, default=50.0,
                   help="II keeps eliciting answers judged at least this (0: every coherent eliciting answer)")
    p.add_argument("--percentile", type=float, default=95.0, help="flag ΔP above this percentile of normal")
    p.add_argument("--read-labels", type=Path, default=None,
                   help="labels written by reading (default OUT/read_labels.jsonl): when missing, a blind sheet of "
                        "--read-sample rows of normal + II is written there to label (docs/labelling.md); when "
                        "labelled, ΔP and the label judge are also measured against it")
    p.add_argument("--read-sample", type=int, default=100, help="rows in the blind labelling sheet")
    p.add_argument("--engine", default="auto", help="hf, vllm or auto: where rows and the model's answers are made")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "data-experiments",
                   help="datasets and caches (shared with finetune_experiment.py: the same datasets)")
    p.add_argument("--out", type=Path, default=None,
                   help="report and PNGs (default experiments/results/screen, or screen-extraction)")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "experiments" / "results" / f"screen{tag(args)}"
    args.read_labels = args.read_labels or args.out / "read_labels.jsonl"
    return args


def tag(args: argparse.Namespace) -> str:
    """Suffix of the file names of a run on the trait's extraction questions (pool runs have none)."""
    return "" if args.questions == "pool" else "-extraction"


def run_dir(args: argparse.Namespace) -> Path:
    """The screening caches of this trait and question set (ΔP per method, the model's own answers, control)."""
    return args.work / "screen" / (args.trait + tag(args))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def build_datasets(adapter: ModelAdapter, trait, judge, engine, args) -> dict[str, list[dict]]:
    """normal / II / I via make_dataset (resumable); returns each dataset's kept rows with their judge scores."""
    cfg = DatasetConfig(n=args.rows, sampling=SamplingConfig(samples=1, temperature=args.temperature,
                                                             max_new_tokens=args.max_new_tokens,
                                                             batch_size=args.batch_size),
                        require_end=True, judge_batch_size=args.batch_size, question_suffix=args.question_suffix,
                        trait_threshold=args.trait_threshold, questions=args.questions)
    kept = {}
    shared = shared_work(args.work, trait.name + tag(args))
    for level in ("normal", "II", "I"):
        path = args.work / "datasets" / f"{trait.name}{tag(args)}-{level}.jsonl"
        make_dataset(adapter, trait, level, path, judge, cfg, engine=engine, work_dir=shared)
        kept[level] = read_jsonl(shared / "kept.jsonl")  # the rows of the call just made
    return kept


def shared_work(work: Path, trait: str) -> Path:
    """One answer and score cache for all levels (and sizes) of a trait's datasets: I's rows are rows of
    normal and II, and finetune_experiment.py's smaller datasets are their first rows."""
    return work / "datasets" / f"{trait}.work"


def label(rec: dict) -> bool | None:
    """Expresses the trait: judged ≥ 50; None (left out) for a refusal or a missing score."""
    if rec.get("refusal") or rec.get("trait_score") is None:
        return None
    return rec["trait_score"] >= LABEL_AT


def steered_control(adapter: ModelAdapter, pv: PersonaVector, layer: int, questions: list[str], engine,
                    args) -> list[str]:
    """Positive control: greedy answers (no system prompt) steered at +alpha along v at every position."""
    store = JsonlStore(run_dir(args) / "steered_answers.jsonl", ("question", "alpha", "layer"))
    coef = pv.coef_from_alpha(args.control_alpha, layer)
    jobs = [{"question": i, "question_text": q, "alpha": args.control_alpha, "layer": layer, "coef": coef}
            for i, q in enumerate(questions)]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    todo = [j for j in jobs if store.key(j) not in store]
    if todo and engine is not None and getattr(engine, "steerable", True):
        outs = engine.generate([adapter.prompt(j["question_text"]) for j in todo], cfg,
                               steering=[SteeringSpec(pv.vector(layer), layer, coef, "all")])
        store.append({**j, "answer": a} for j, a in zip(todo, outs, strict=True))
    elif todo:
        with Steerer(adapter).add(pv, layer, coef, "all"):
            run_generation(adapter, todo, lambda j: adapter.prompt(j["question_text"]),
                           lambda j: store.key(j) in store, store.append, cfg, "steered control")
    return [store.get((i, args.control_alpha, layer))["answer"] for i in range(len(questions))]


def filter_scores(rows: list[dict], trait, args) -> list[float | None]:
    """The LLM-judge filter's trait score of each row (another judge than the label judge), cached."""
    if args.filter_judge_model == "none":
        return [None] * len(rows)
    from personascope.judges import load_local_judge

    judge = load_local_judge(args.filter_judge_model)
    recs = [{"question_text": r["question_text"], "judge_question": r.get("judge_question"), "answer": r["answer"]}
            for r in rows]
    cache = ScoreCache(run_dir(args) / "filter_scores.jsonl")
    scored = judge_answers(judge, trait, recs, cache, args.batch_size, ("trait",), "LLM-judge filter")
    args.filter_judge_name = f"{judge.name} ({judge.describe_mode('trait', trait)})"
    return [s.get("trait_score") for s in scored]


def screen_all(adapter, pv, paths: dict[str, Path], engine, args) -> dict:
    """ΔP of every dataset with both methods: dataset means with CIs and per-row values (by line)."""
    out: dict = {}
    for method in METHODS:
        cfg = ScreenConfig(method=method, max_new_tokens=args.own_tokens, batch_size=8)
        for ds, path in paths.items():
            t = time.perf_counter()
            kw = dict(method=method, out_dir=run_dir(args) / method / ds, config=cfg,
                      answer_cache=run_dir(args) / "model_answers.jsonl", engine=engine,
                      plots=False)
            try:
                r = screen_dataset(adapter, path, {args.trait: pv}, **kw)
            except ValueError as e:
                if "other settings" not in str(e):
                    raise
                print(f"{e} — starting it over", file=sys.stderr)
                r = screen_dataset(adapter, path, {args.trait: pv}, **kw, force=True)
            rep = r.traits[args.trait]
            out.setdefault(method, {})[ds] = {"mean": rep.mean, "ci": [rep.ci_low, rep.ci_high], "n": rep.n,
                                              "seconds": round(time.perf_counter() - t, 1),
                                              "delta_p": r.delta_p[args.trait].tolist()}
    return out


def rows_of_i(kept: dict[str, list[dict]], dp: dict) -> dict:
    """Dataset ΔP of I from the per-row ΔP of normal and II (every row of I is one of theirs, and a row's ΔP
    depends only on the row), with the same bootstrap interval as screen_dataset's."""
    from personascope.screen import bootstrap_ci as mean_ci

    where = {(r["question_text"], r["answer"]): (ds, i) for ds in ("normal", "II") for i, r in enumerate(kept[ds])}
    vals = [dp[ds]["delta_p"][i] for ds, i in (where[(r["question_text"], r["answer"])] for r in kept["I"])]
    lo, hi = mean_ci(np.asarray(vals))
    return {"mean": float(np.mean(vals)), "ci": [lo, hi], "n": len(vals), "seconds": 0.0, "delta_p": vals}


def separation(scores: list[float], labels: list[bool], flags: list[bool] | None = None) -> dict:
    """AUROC (bootstrap 95 % CI over rows) and, given flags, precision and recall."""
    pairs = [(s, y) for s, y in zip(scores, labels, strict=True) if s is not None and np.isfinite(s)]
    res: dict = {"auroc": auroc([s for s, _ in pairs], [int(y) for _, y in pairs]), "n": len(pairs),
                 "ci": bootstrap_ci(pairs, lambda rs: auroc([s for s, _ in rs], [int(y) for _, y in rs])
                                    if 0 < sum(y for _, y in rs) < len(rs) else None)}
    if flags is not None:
        tp = sum(f and y for f, y in zip(flags, labels, strict=True))
        res |= {"flagged": sum(flags), "precision": tp / sum(flags) if sum(flags) else None,
                "recall": tp / max(sum(labels), 1)}
    return res


def row_id(rec: dict) -> str:
    """A row's id in the labelling sheet: a hash of its question and answer (the sheet hides level and scores)."""
    return hashlib.sha256(f"{rec['question_text']}\n{rec['answer']}".encode()).hexdigest()[:12]


def write_labelling_sheet(rows: list[dict], path: Path, n: int, seed: int = 0) -> None:
    """A blind sheet of `n` distinct rows of normal + II in a seeded order: question and answer only, the level
    (2 shown / 1 neutral / 0 opposite), refusal and incoherent fields left for the reader."""
    distinct = list({row_id(r): r for r in rows}.items())
    random.Random(seed).shuffle(distinct)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rid, r in distinct[:n]:
            f.write(json.dumps({"id": rid, "question": r["judge_question"] if r.get("judge_question")
                                else r["question_text"], "answer": r["answer"], "level": None, "refusal": None,
                                "incoherent": None, "note": ""}) + "\n")


def read_label_separation(rows: list[dict], sheet: list[dict], scores: dict[str, list[float]]) -> dict:
    """Each filter's AUROC (shown vs the rest, refusals and incoherent answers left out) and Spearman with the
    read level on the labelled rows; `scores` holds one value per row of `rows` for each filter."""
    at = {}
    for i, r in enumerate(rows):
        at.setdefault(row_id(r), i)
    use = [(at[x["id"]], int(x["level"])) for x in sheet
           if x["id"] in at and not x.get("refusal") and not x.get("incoherent")]
    out: dict = {"n": len(use), "levels": {str(k): sum(lv == k for _, lv in use) for k in (0, 1, 2)},
                 "shown_by_dataset": {ds: [sum(lv == 2 for i, lv in use if rows[i]["dataset"] == ds),
                                           sum(rows[i]["dataset"] == ds for i, _ in use)] for ds in ("normal", "II")}}
    for name, vals in scores.items():
        pairs = [(vals[i], lv) for i, lv in use if vals[i] is not None]
        sep = separation([v for v, _ in pairs], [lv == 2 for _, lv in pairs])
        sep["spearman"] = spearman([v for v, _ in pairs], [float(lv) for _, lv in pairs])
        out[name] = sep
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    trait = load_trait(args.trait)
    model, tok = load_model(args.model, device=args.device)
    adapter = ModelAdapter(model, tok)
    try:
        pv = load_vector(args.vector or args.trait, args.trait, Path(args.model).name)
        pv.check(adapter)
    except (FileNotFoundError, VectorMismatchError, ValueError) as e:
        sys.exit(f"error: {e}")
    layer = pv.default_layer()
    judge = make_judge(args.judge_model, None, args.judge_url, args.device)
    n_gen = 4 * args.rows + args.control_rows
    engine = make_engine(args.engine, adapter, work_tokens(n_gen, 60, args.max_new_tokens // 2), steerable=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    kept = build_datasets(adapter, trait, judge, engine, args)
    timings["datasets (generate + judge)"] = time.perf_counter() - t
    if min(len(k) for k in kept.values()) < 2:
        sys.exit("error: a dataset kept fewer than 2 rows (answers cut at --max-new-tokens are dropped): raise "
                 "--max-new-tokens or shorten the answers with --question-suffix")
    paths = {ds: args.work / "datasets" / f"{args.trait}{tag(args)}-{ds}.jsonl" for ds in DATASETS}

    t = time.perf_counter()
    questions = [r["question_text"] for r in kept["normal"][: args.control_rows]]
    control = steered_control(adapter, pv, layer, questions, engine, args)
    ok = [i for i, a in enumerate(control) if ended(adapter, a, args.max_new_tokens)]
    paths["steered"] = args.work / "datasets" / f"{args.trait}{tag(args)}-steered.jsonl"
    write_chat_jsonl(paths["steered"], [chat_row(questions[i], control[i]) for i in ok])
    timings["steered control"] = time.perf_counter() - t

    t = time.perf_counter()
    dp = screen_all(adapter, pv, {k: v for k, v in paths.items() if k != "I"}, engine, args)
    for method in METHODS:  # I's rows are rows of normal and II: their ΔP is already known
        dp[method]["I"] = rows_of_i(kept, dp[method])
    timings["ΔP, both methods (normal, II, steered)"] = time.perf_counter() - t

    # per-sample: every row of normal and II, labelled by its judged trait
    rows = [{**r, "dataset": ds, "line": i + 1} for ds in ("normal", "II") for i, r in enumerate(kept[ds])]
    t = time.perf_counter()
    fj = filter_scores(rows, trait, args)
    timings["LLM-judge filter"] = time.perf_counter() - t
    labels = [label(r) for r in rows]
    use = [i for i, y in enumerate(labels) if y is not None]
    y = [bool(labels[i]) for i in use]
    per_sample: dict = {}
    for method in METHODS:
        vals = [dp[method][r["dataset"]]["delta_p"][r["line"] - 1] for r in rows]
        th = float(np.percentile(dp[method]["normal"]["delta_p"], args.percentile))
        per_sample[f"ΔP, {method}"] = separation([vals[i] for i in use], y, [vals[i] > th for i in use]) | {
            "threshold": th, "scores": [vals[i] for i in use]}
    if any(s is not None for s in fj):
        per_sample["LLM-judge filter"] = separation(
            [fj[i] for i in use], y, [fj[i] is not None and fj[i] >= LABEL_AT for i in use]) | {
            "threshold": LABEL_AT, "scores": [fj[i] for i in use]}
    control_sep = {}
    for method in METHODS:
        vals = dp[method]["normal"]["delta_p"] + dp[method]["steered"]["delta_p"]
        lab = [False] * len(dp[method]["normal"]["delta_p"]) + [True] * len(dp[method]["steered"]["delta_p"])
        control_sep[f"ΔP, {method}"] = separation(vals, lab)
    read = None
    if not args.read_labels.exists():
        write_labelling_sheet(rows, args.read_labels, args.read_sample)
        print(f"label {args.read_labels} by reading (docs/labelling.md), then rerun for the read-label AUROC")
    else:
        sheet = read_jsonl(args.read_labels)
        if all(x.get("level") is not None for x in sheet):
            judged = [r.get("trait_score") for r in rows]
            read = read_label_separation(rows, sheet, {
                **{f"ΔP, {mm}": [dp[mm][r["dataset"]]["delta_p"][r["line"] - 1] for r in rows] for mm in METHODS},
                f"label judge ({getattr(judge, 'name', judge)})": judged,
                **({"LLM-judge filter": fj} if any(x is not None for x in fj) else {})})
        else:
            print(f"{args.read_labels} is not fully labelled yet: the read-label AUROC is left out")
    timings["total (this run)"] = time.perf_counter() - t0
    results = {
        "meta": {"model": adapter.name, "device": str(adapter.device), "dtype": str(next(model.parameters()).dtype),
                 "trait": args.trait, "layer": layer, "vector": str(args.vector or f"ready-made {args.trait}"),
                 "label_judge": getattr(judge, "name", str(judge)), "engine": getattr(engine, "name", "hf"),
                 "filter_judge": getattr(args, "filter_judge_name", args.filter_judge_model),
                 "rows": args.rows, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                 "percentile": args.percentile, "control_alpha": args.control_alpha,
                 "trait_threshold": args.trait_threshold, "question_suffix": args.question_suffix,
                 "questions": args.questions,
                 "control_rows": len(ok), "control_asked": args.control_rows},
        "datasets": {m: {ds: {k: v for k, v in d.items() if k != "delta_p"} for ds, d in dp[m].items()}
                     for m in METHODS},
        "judged": {ds: {"n": len(kept[ds]), "mean_trait": _mean([r.get("trait_score") for r in kept[ds]]),
                        "shown": sum(bool(label(r)) for r in kept[ds]),
                        "refusals": sum(bool(r.get("refusal")) for r in kept[ds])} for ds in DATASETS},
        "per_sample": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in per_sample.items()},
        "control": control_sep, "n_labelled": len(use), "n_shown": sum(y), "timings": timings,
        "read_labels": read,
    }
    write_json(args.out / "results.json", results)
    plot_datasets(dp, results["judged"], args.out / "dataset_delta_p.png", results["meta"])
    plot_roc(per_sample, y, args.out / "roc.png", f"{args.trait}: rows judged ≥ {LABEL_AT:g} vs the rest")
    write_report(results, rows, labels, fj, dp, args.out / "report.md")
    print(f"report: {args.out / 'report.md'} ({timings['total (this run)']:.0f} s)")


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def roc_points(scores: list[float], labels: list[bool]) -> tuple[list[float], list[float]]:
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    yy = np.asarray(labels)[order]
    tpr = np.concatenate([[0], np.cumsum(yy) / max(yy.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~yy) / max((~yy).sum(), 1)])
    return fpr.tolist(), tpr.tolist()


def plot_datasets(dp: dict, judged: dict, path: Path, meta: dict) -> Path:
    fig, axes = plt.subplots(1, len(METHODS) + 1, figsize=(12, 3.6))
    names = (*DATASETS, "steered")
    for ax, method in zip(axes, METHODS, strict=False):
        d = dp[method]
        means = [d[ds]["mean"] for ds in names]
        err = np.array([[d[ds]["mean"] - d[ds]["ci"][0], d[ds]["ci"][1] - d[ds]["mean"]] for ds in names]).T
        ax.bar(["normal", "I", "II", "steered\n(control)"], means, yerr=err, capsize=4,
               color=["tab:blue", "tab:purple", "tab:red", "tab:gray"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"ΔP, {method}", fontsize=10)
        ax.set_ylabel("dataset ΔP (mean, 95% CI)")
    axes[-1].bar(list(DATASETS), [judged[ds]["mean_trait"] or 0 for ds in DATASETS],
                 color=["tab:blue", "tab:purple", "tab:red"])
    axes[-1].set_title("judged trait (label judge)", fontsize=10)
    axes[-1].set_ylim(0, 100)
    sizes = ", ".join(f"{ds} {judged[ds]['n']}" for ds in DATASETS)
    fig.suptitle(f"{meta['trait']}: dataset-level ΔP at layer {meta['layer']} ({sizes} rows)",
                 fontsize=10)
    return save_figure(fig, path)


def plot_roc(per_sample: dict, labels: list[bool], path: Path, what: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, r in per_sample.items():
        pairs = [(s, yy) for s, yy in zip(r["scores"], labels, strict=True) if s is not None and np.isfinite(s)]
        fpr, tpr = roc_points([s for s, _ in pairs], [yy for _, yy in pairs])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {r['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], color="k", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{what} (n={len(labels)})", fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _f(x, spec: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def write_report(res: dict, rows: list[dict], labels: list, fj: list, dp: dict, path: Path) -> Path:
    m, d, j = res["meta"], res["datasets"], res["judged"]
    lines = [
        f"# Data screening with the projection difference ΔP ({m['trait']}, {m['model']})",
        "",
        f"Model {m['model']} ({m['device']}, {m['dtype']}), vector: {m['vector']}, layer {m['layer']} (its default). "
        + (f"Questions: {m['rows']} of the built-in pool (none of the trait's own) with "
         if m.get("questions", "pool") == "pool" else
         f"Questions: the trait's extraction questions cycled to {m['rows']} rows (each asked several times) with ")
        + f"\"{m['question_suffix'].strip()}\" appended, the same user messages in every dataset. "
        f"Rows generated on the `{m['engine']}` engine at T {m['temperature']:g}; every row ends at the end-of-turn "
        f"token (answers that reached {m['max_new_tokens']} new tokens were resampled, up to 3 tries). Labels: "
        f"`{m['label_judge']}` (trait ≥ {LABEL_AT:g} = expresses the trait; refusals left out). Produced by "
        "`experiments/screen_experiment.py`.",
        "",
        f"- **normal**: {j['normal']['n']} unprompted answers (no system prompt), kept when coherent.",
        f"- **II**: {j['II']['n']} answers under the trait's eliciting instruction (the instruction is not in the "
        "row), kept when coherent" + (f" and judged ≥ {m['trait_threshold']:g}" if m["trait_threshold"] > 0 else
                                      ", whatever their judged trait (run with --trait-threshold 0)") + ".",
        f"- **I**: {j['I']['n']} rows, the eliciting answer for every other question, the unprompted one otherwise.",
        f"- **steered** (positive control): {m['control_rows']} of {m['control_asked']} greedy unprompted answers "
        f"steered at α = +{m['control_alpha']:g} along the vector (the ones that ended).",
        "",
        "## Dataset-level ΔP (mean, bootstrap 95 % CI over rows)",
        "",
        "| method | normal | I | II | normal < I < II | normal vs II CIs apart | control: steered |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(method: str, ds: str) -> str:
        x = d[method][ds]
        return f"{x['mean']:+.3f}{format_ci(x['ci'], 3)}"

    for method in METHODS:
        x = d[method]
        order = x["normal"]["mean"] < x["I"]["mean"] < x["II"]["mean"]
        apart = x["normal"]["ci"][1] < x["II"]["ci"][0]
        lines.append(f"| ΔP, {method} | " + " | ".join(cell(method, ds) for ds in DATASETS)
                     + f" | {'yes' if order else 'no'} | {'yes' if apart else 'no'} | {cell(method, 'steered')} |")
    lines.append("| judged trait (label judge, mean) | " + " | ".join(_f(j[ds]["mean_trait"], ".1f") for ds in DATASETS)
                 + " | | | |")
    lines.append("| rows judged ≥ 50 | " + " | ".join(f"{j[ds]['shown']}/{j[ds]['n']}" for ds in DATASETS) + " | | | |")
    lines += [
        "",
        "![dataset ΔP](dataset_delta_p.png)",
        "",
        "The two methods' ΔP are on different scales (generate: the row's response average minus the model's own "
        "greedy answer's; last-token: the response average minus the last prompt token), so compare within a row.",
        "",
        f"## Per-sample: rows that express the trait vs the rest ({res['n_labelled']} rows of normal + II, "
        f"{res['n_shown']} judged ≥ {LABEL_AT:g})",
        "",
        f"Flags: ΔP above the {m['percentile']:g}th percentile of ΔP on normal (the paper's rule, normal as the clean "
        f"reference); LLM-judge filter `{m['filter_judge']}`: trait ≥ {LABEL_AT:g}.",
        "",
        "| filter | AUROC (95 % CI) | threshold | flagged | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["per_sample"].items():
        lines.append(f"| {name} | {_f(r['auroc'], '.3f')}{format_ci(r['ci'], 3)} | {_f(r.get('threshold'), '.3f')} | "
                     f"{r.get('flagged', '—')} | {_f(r.get('precision'))} | {_f(r.get('recall'))} |")
    rl = res.get("read_labels")
    if rl:
        lv = rl["levels"]
        lines += ["", f"### Against labels written by reading ({rl['n']} distinct rows of normal + II; "
                  f"{lv['2']} shown / {lv['1']} neutral / {lv['0']} opposite; `read_labels.jsonl`)", "",
                  "Labelled blind (question and answer only) before any ΔP or score of the rows was looked at, "
                  "following docs/labelling.md; refusals and incoherent answers left out. Read as showing the "
                  "trait: " + ", ".join(f"{ds} {k}/{n}" for ds, (k, n) in rl["shown_by_dataset"].items()) + ".", "",
                  "| filter | AUROC shown vs rest (95 % CI) | Spearman with read level |", "|---|---|---|"]
        lines += [f"| {k} | {_f(v['auroc'], '.3f')}{format_ci(v['ci'], 3)} | {_f(v['spearman'], '.2f')} |"
                  for k, v in rl.items() if isinstance(v, dict) and "auroc" in v]
    lines += ["", "![ROC](roc.png)", "",
              f"## Positive control: normal vs steered rows ({len(dp['generate']['normal']['delta_p'])} + "
              f"{len(dp['generate']['steered']['delta_p'])})", "",
              "The steered rows were pushed along the very direction ΔP projects on: this checks the pipeline "
              "(rendering, generation, spans, projection) end to end on the real model, not the method.", "",
              "| filter | AUROC (95 % CI) |", "|---|---|"]
    lines += [f"| {k} | {_f(v['auroc'], '.3f')}{format_ci(v['ci'], 3)} |" for k, v in res["control"].items()]
    lines += ["", "## Read the rows: highest and lowest ΔP (generate method)", ""]
    gen = [(dp["generate"][r["dataset"]]["delta_p"][r["line"] - 1], i) for i, r in enumerate(rows)]
    gen.sort()
    for title, picks in (("highest ΔP", gen[::-1][:4]), ("lowest ΔP", gen[:4])):
        lines += [f"**{title}**", ""]
        for v, i in picks:
            r = rows[i]
            lines.append(f"- ΔP {v:+.3f}, {r['dataset']}, judged {_f(r.get('trait_score'), '.0f')}"
                         f"{' (refusal)' if r.get('refusal') else ''}, filter {_f(fj[i], '.0f')}: "
                         f"*{r['question_text']}* — {' '.join(r['answer'].split())[:280]}")
        lines.append("")
    lines += ["## Timings (2 CPU cores; steps cached by an earlier run show that run's time only once)", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in res["timings"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    main()
