"""Judge quality on the shipped labelled set: per-row scores of each local scoring mode, the per-trait
mode choice on a selection split, held-out AUC of that choice, and the calibration of the contrastive mode.

    python experiments/judge_selection.py [--judge MODEL (default: the default judge)] [--modes contrastive,binary]

Rows are split per trait: the first 10 positive and first 10 negative rows select the mode, the other
24 rows measure it. Writes experiments/results/judge/{scores.jsonl, report.md, reliability_*.png} and
src/personascope/data/judge_modes.json (the per-trait choice the `auto` mode uses).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from personascope.judges import JudgeEvalResult, JudgeRequest, LocalJudge, labelled_set, plot_reliability
from personascope.model import DEFAULT_JUDGE_MODEL, load_model
from personascope.traits import builtin_traits, load_trait
from personascope.util import JsonlStore
from personascope.util import auroc as auc

OUT = Path(__file__).parent / "results" / "judge"
MODES_FILE = Path(__file__).parents[1] / "src" / "personascope" / "data" / "judge_modes.json"


def split(rows: list[dict]) -> tuple[list[int], list[int]]:
    """Indices of the selection split (first 10 of each label) and of the held-out rest."""
    sel, seen = [], {0: 0, 1: 0}
    for i, r in enumerate(rows):
        if seen[r["label"]] < 10:
            sel.append(i)
            seen[r["label"]] += 1
    return sel, [i for i in range(len(rows)) if i not in sel]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", default=DEFAULT_JUDGE_MODEL)
    ap.add_argument("--modes", default="contrastive,binary")
    ap.add_argument("--report-only", action="store_true", help="Rebuild the report from stored scores.")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    store = JsonlStore(OUT / "scores.jsonl", ("judge", "mode", "set", "row"))
    if args.report_only:
        report(args.judge, store)
        return
    model, tok = load_model(args.judge)
    modes = args.modes.split(",")
    for name in [*builtin_traits(), "coherence"]:
        rows = labelled_set(name)
        trait = None if name == "coherence" else load_trait(name)
        kind = "coherence" if trait is None else "trait"
        for mode in (["binary", "logprob"] if kind == "coherence" else modes):
            kw = {"coherence_mode": mode} if kind == "coherence" else {"trait_mode": mode}
            judge = LocalJudge(model, tok, **kw)
            todo = [i for i in range(len(rows)) if (args.judge, mode, name, i) not in store]
            for s in range(0, len(todo), 8):
                idx = todo[s : s + 8]
                t0 = time.perf_counter()
                scores = judge.score([JudgeRequest(kind, rows[i]["question"], rows[i]["answer"], trait) for i in idx])
                dt = (time.perf_counter() - t0) / len(idx)
                store.append({"judge": args.judge, "mode": mode, "set": name, "row": i, "score": sc,
                              "label": rows[i]["label"], "kind": rows[i].get("kind"), "seconds": dt}
                             for i, sc in zip(idx, scores, strict=True))
            print(name, mode, "done", flush=True)
    report(args.judge, store)


def report(judge: str, store: JsonlStore) -> None:
    recs = list(store.records.values())
    lines = [f"# Judge selection: local:{judge}", "",
             "Selection split: first 10 positive + 10 negative rows per set; held-out: the other 24.", "",
             "| set | mode | AUC (all 44) | AUC selection | AUC held-out | mean + | mean − | s/judgement |",
             "|---|---|---|---|---|---|---|---|"]
    choice, held = {}, {}
    sets = [*builtin_traits(), "coherence"]
    for name in sets:
        rows = labelled_set(name)
        sel, rest = split(rows)
        best = None
        for mode in sorted({r["mode"] for r in recs if r["set"] == name}):
            by_row = {r["row"]: r for r in recs if r["set"] == name and r["mode"] == mode}
            if len(by_row) < len(rows):
                continue

            def score(i, by_row=by_row):
                s = by_row[i]["score"]
                return 50.0 if s is None else s

            labels = [rows[i]["label"] for i in range(len(rows))]
            a_all = auc([score(i) for i in range(len(rows))], labels)
            a_sel = auc([score(i) for i in sel], [labels[i] for i in sel])
            a_rest = auc([score(i) for i in rest], [labels[i] for i in rest])
            mp = sum(score(i) for i in range(len(rows)) if labels[i]) / labels.count(1)
            mn = sum(score(i) for i in range(len(rows)) if not labels[i]) / labels.count(0)
            sec = sum(r["seconds"] for r in by_row.values()) / len(by_row)
            lines.append(f"| {name} | {mode} | {a_all:.3f} | {a_sel:.3f} | {a_rest:.3f} | {mp:.1f} | {mn:.1f} "
                         f"| {sec:.2f} |")
            if best is None or a_sel > best[1]:
                best = (mode, a_sel, a_rest)
        if best:
            choice[name], held[name] = best[0], best[2]
    traits = [n for n in choice if n != "coherence"]
    lines += ["", "## Per-trait choice (by selection-split AUC) and its held-out AUC", "",
              "| set | chosen mode | held-out AUC |", "|---|---|---|"]
    lines += [f"| {n} | {choice[n]} | {held[n]:.3f} |" for n in choice]
    if traits:
        mean = sum(held[n] for n in traits) / len(traits)
        lines += ["", f"Mean held-out AUC over the {len(traits)} traits with the per-trait choice: **{mean:.3f}**"]
    lines += ["", "Reliability plots (fraction labelled positive per score bin): "
              + ", ".join(f"`reliability_{m}.png`" for m in plot_reliability_files(judge, recs)), ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    MODES_FILE.write_text(json.dumps({"judge": f"local:{judge}", "trait_modes": {n: choice[n] for n in traits},
                                      "coherence_mode": choice.get("coherence")}, indent=2) + "\n")
    print("\n".join(lines))


def plot_reliability_files(judge: str, recs: list[dict]) -> list[str]:
    """One reliability plot per mode, one line per set, from the stored per-row scores."""
    modes = sorted({r["mode"] for r in recs})
    for mode in modes:
        results = []
        for name in sorted({r["set"] for r in recs if r["mode"] == mode}):
            rows = sorted((r for r in recs if r["mode"] == mode and r["set"] == name), key=lambda r: r["row"])
            scores, labels = [r["score"] for r in rows], [r["label"] for r in rows]
            filled = [50.0 if x is None else x for x in scores]
            results.append(JudgeEvalResult(name, f"local:{judge}", mode, len(rows), scores.count(None),
                                           auc(filled, labels), 0.0, 0.0, 0.0, 0.0, scores, labels))
        plot_reliability(results, OUT / f"reliability_{mode}.png")
    return modes


if __name__ == "__main__":
    main()
