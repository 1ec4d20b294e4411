"""Judge quality on the shipped labelled answer set: AUC, accuracy at 50, calibration, speed."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from personascope.traits import builtin_traits, load_trait
from personascope.util import auroc, write_json

from .local import Judge, JudgeRequest, LocalJudge

LABELLED_SETS = ("written", "real")


def labelled_set(name: str, source: str = "written") -> list[dict]:
    """The labelled rows for a built-in trait, or for 'coherence'.

    `written`: data/judge_eval (label 1/0). `real`: data/judge_real, answers the built-in models wrote, with
    label 1 = trait shown and 0 = neutral or opposite; refusals and incoherent answers are left out.
    """
    if source not in LABELLED_SETS:
        raise ValueError(f"unknown labelled set {source!r}; choose from {', '.join(LABELLED_SETS)}")
    folder = "judge_eval" if source == "written" else "judge_real"
    path = Path(str(resources.files("personascope") / "data" / folder / f"{name}.jsonl"))
    if not path.exists():
        raise FileNotFoundError(f"no {source} labelled judge set for {name!r}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source == "real":
        rows = [{**r, "label": int(r["level"] == 2)} for r in rows if not r["refusal"] and not r["incoherent"]]
    return rows


@dataclass
class JudgeEvalResult:
    """Agreement of one judge mode with the labels of one set."""

    name: str
    judge: str
    mode: str
    n: int
    missing: int
    auc: float
    accuracy: float
    mean_pos: float
    mean_neg: float
    seconds_per_judgement: float
    scores: list
    labels: list


def evaluate_judge(judge: Judge, sets: list[str] | None = None, limit: int | None = None,
                   source: str = "written") -> list[JudgeEvalResult]:
    """Run the judge over the labelled sets (traits by name, plus 'coherence' for the written source)."""
    sets = sets or [*builtin_traits(), *(["coherence"] if source == "written" else [])]
    results = []
    for name in sets:
        rows = labelled_set(name, source)
        if limit:
            # keep the label balance when trimming
            rows = [r for r in rows if r["label"] == 1][: limit // 2] + [r for r in rows if r["label"] == 0][
                : limit - limit // 2]
        kind = "coherence" if name == "coherence" else "trait"
        trait = None if kind == "coherence" else load_trait(name)
        reqs = [JudgeRequest(kind, r["question"], r["answer"], trait) for r in rows]
        t0 = time.perf_counter()
        scores = []
        for s in range(0, len(reqs), 8):
            scores += judge.score(reqs[s : s + 8])
        dt = (time.perf_counter() - t0) / max(len(reqs), 1)
        labels = [int(r["label"]) for r in rows]
        filled = [50.0 if s is None else s for s in scores]  # a missing score is "undecided"
        results.append(JudgeEvalResult(
            name=name, judge=judge.name, mode=judge.mode_for(kind), n=len(rows),
            missing=sum(s is None for s in scores), auc=auroc(filled, labels),
            accuracy=float(np.mean([(s >= 50) == (y == 1) for s, y in zip(filled, labels, strict=True)])),
            mean_pos=float(np.mean([s for s, y in zip(filled, labels, strict=True) if y == 1])),
            mean_neg=float(np.mean([s for s, y in zip(filled, labels, strict=True) if y == 0])),
            seconds_per_judgement=dt, scores=scores, labels=labels))
    return results


def plot_reliability(results: list[JudgeEvalResult], path: Path) -> Path:
    """Calibration: fraction labelled positive per score bin, one line per set."""
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    bins = np.linspace(0, 100, 6)
    for r in results:
        s = np.array([50.0 if x is None else x for x in r.scores])
        y = np.array(r.labels)
        xs, ys = [], []
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            m = (s >= lo) & (s < hi if hi < 100 else s <= hi)
            if m.any():
                xs.append(s[m].mean())
                ys.append(y[m].mean() * 100)
        ax.plot(xs, ys, marker="o", label=f"{r.name} (AUC {r.auc:.2f})")
    ax.plot([0, 100], [0, 100], color="k", lw=0.8, ls=":")
    ax.set_xlabel("judge score")
    ax.set_ylabel("% labelled positive")
    ax.set_title(f"reliability: {results[0].judge}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, Path(path))


def results_table(results: list[JudgeEvalResult]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k not in ("scores", "labels")} for r in results]


def compare_modes(model, tokenizer, judge_name: str, trait_modes: list[str], coherence_modes: list[str],
                  traits: list[str] | None, limit: int | None, out: Path, source: str = "written") -> list[dict]:
    """One loaded judge model under each trait and coherence mode: result rows (also in judge_eval.json) and a
    reliability plot per mode under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    runs = [(f"reliability_{m}.png", LocalJudge(model, tokenizer, trait_mode=m, name=judge_name),
             traits or builtin_traits()) for m in trait_modes]
    runs += [(f"reliability_coherence_{m}.png", LocalJudge(model, tokenizer, coherence_mode=m, name=judge_name),
              ["coherence"]) for m in coherence_modes]
    if source == "real":
        runs = [r for r in runs if r[2] != ["coherence"]]  # the real set labels trait levels only
    for plot_name, judge, sets in runs:
        res = evaluate_judge(judge, sets, limit, source)
        for r in res:
            r.name = f"{r.name} ({source})"
        plot_reliability(res, out / plot_name)
        rows += results_table(res)
    write_json(out / "judge_eval.json", rows)
    return rows
