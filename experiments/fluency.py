"""Fit and measure the fluency measure on the real-answer set's read labels (docs/labelling.md).

Every answer of the set gets its judge-free features (repetition, compression, foreign script, and the
unsteered model's mean NLL of the answer after its own prompt — each answer scored by the model that
wrote it). A logistic model is fitted on the tuning part (questions 0–6), its P(fluent) threshold chosen
there, and it is measured once on the held-out part (questions 7–9): AUROC for incoherent vs coherent,
loops and gibberish apart (a loop: an incoherent answer whose word 3-grams repeat, read `note` "loop"),
beside the probe judge's coherence head on the same answers. Writes `data/fluency.json` (with `--write`)
and `experiments/results/fluency/report.md`.

    python experiments/fluency.py --write
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from personascope import load_model
from personascope.judges import (
    FLUENCY_FEATURES,
    HELDOUT_FROM,
    FluencyModel,
    JudgeRequest,
    ProbeJudge,
    ProbeWeights,
    answer_nll,
    probe_weights_path,
    text_features,
)
from personascope.model import ModelAdapter
from personascope.traits import builtin_traits, load_trait
from personascope.util import auroc, bootstrap_ci, data_path, write_json

HERE = Path(__file__).parent
OUT = HERE / "results" / "fluency"
TARGET_COHERENT_PASS = 0.97  # the threshold keeps at least this share of the tuning part's coherent answers


def rows_of_set() -> list[dict]:
    """Every row of the real-answer set with its trait."""
    out = []
    for trait in builtin_traits():
        path = data_path("judge_real", f"{trait}.jsonl")
        out += [{**json.loads(line), "trait": trait} for line in path.read_text().splitlines() if line.strip()]
    return out


def kind(row: dict) -> str:
    """coherent, loop or gibberish (every other incoherent answer: word salad, script switches, off-topic)."""
    if not row["incoherent"]:
        return "coherent"
    return "loop" if row.get("note", "").startswith("loop") else "gibberish"


def add_features(rows: list[dict], threads: int) -> None:
    """Text features and each answer's NLL under the unsteered model that wrote it (cached beside the report)."""
    cache_path = OUT / "features.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    todo = [r for r in rows if r["id"] not in cache]
    torch.set_num_threads(threads)
    for model_name in sorted({r["model"] for r in todo}):
        mine = [r for r in todo if r["model"] == model_name]
        model, tok = load_model(model_name)
        adapter = ModelAdapter(model, tok)
        prompts = [adapter.prompt(r["question"], r.get("system")) for r in mine]
        for s in range(0, len(mine), 16):
            nlls = answer_nll(adapter, prompts[s : s + 16], [r["answer"] for r in mine[s : s + 16]])
            for r, n in zip(mine[s : s + 16], nlls, strict=True):
                cache[r["id"]] = {**text_features(r["question"], r["answer"]), "nll": n}
            OUT.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
        del model
    for r in rows:
        r["features"] = cache[r["id"]]


def matrix(rows: list[dict], nll_missing: float) -> np.ndarray:
    return np.array([[nll_missing if r["features"][k] is None else r["features"][k] for k in FLUENCY_FEATURES]
                     for r in rows], dtype=float)


def fit(rows: list[dict], l2: float = 1.0) -> FluencyModel:
    """Logistic regression (Newton's method, L2 on the weights) of fluent on the standardised features."""
    nll_missing = float(np.median([r["features"]["nll"] for r in rows if r["features"]["nll"] is not None]))
    x = matrix(rows, nll_missing)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    y = np.array([0.0 if r["incoherent"] else 1.0 for r in rows])
    w = np.zeros(z.shape[1])
    reg = np.diag([l2] * (z.shape[1] - 1) + [0.0])
    for _ in range(50):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + reg @ w
        hess = z.T @ (z * (p * (1 - p))[:, None]) + reg
        w -= np.linalg.solve(hess, grad)
    p = 1 / (1 + np.exp(-z @ w))
    coherent = np.sort(p[y == 1])
    threshold = float(coherent[int(math.floor((1 - TARGET_COHERENT_PASS) * len(coherent)))])
    return FluencyModel(mean.tolist(), scale.tolist(), w[:-1].tolist(), float(w[-1]), threshold, nll_missing)


def probe_coherence(rows: list[dict]) -> dict[str, float]:
    """The 0.5B probe judge's coherence head on the 0.5B's answers (the only probe the package ships)."""
    name = "qwen2.5-coder-0.5b"
    model, tok = load_model(name)
    judge = ProbeJudge(ModelAdapter(model, tok), ProbeWeights.load(probe_weights_path(name)), name=f"probe:{name}")
    mine = [r for r in rows if r["model"] == name]
    reqs = [JudgeRequest("coherence", r["question"], r["answer"], load_trait(r["trait"])) for r in mine]
    scores = judge.score(reqs)
    return {r["id"]: s for r, s in zip(mine, scores, strict=True) if s is not None}


def measure(rows: list[dict], score: dict[str, float], label: str) -> dict:
    """AUROC of a fluency score (higher = more fluent) for coherent vs each kind of broken answer, with CIs."""
    out: dict = {"measure": label}
    for name, broken in (("all", ("loop", "gibberish")), ("loops", ("loop",)), ("gibberish", ("gibberish",))):
        sel = [r for r in rows if r["id"] in score and kind(r) in ("coherent", *broken)]
        ys = [0 if r["incoherent"] else 1 for r in sel]
        xs = [score[r["id"]] for r in sel]
        if len(set(ys)) < 2:
            out[name] = None
            continue
        lo, hi = bootstrap_ci(list(zip(xs, ys, strict=True)), lambda s: auroc([a for a, _ in s], [b for _, b in s]))
        out[name] = {"auroc": auroc(xs, ys), "ci": [lo, hi], "n_broken": ys.count(0), "n_coherent": ys.count(1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="write the fitted model to the package's data/fluency.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = rows_of_set()
    add_features(rows, args.threads)
    tune = [r for r in rows if r["question_index"] < HELDOUT_FROM]
    held = [r for r in rows if r["question_index"] >= HELDOUT_FROM]
    model = fit(tune)
    if args.write:
        model.save(data_path("fluency.json"))
    fl = {r["id"]: model.p_fluent(r["features"]) for r in rows}
    results = [measure(held, fl, "fluency (judge-free)")]
    probe = probe_coherence(held)
    results.append(measure(held, probe, "probe judge coherence head (0.5B answers only)"))
    results.append(measure([r for r in held if r["id"] in probe], fl, "fluency on the same 0.5B answers"))
    flags = {r["id"]: fl[r["id"]] >= model.threshold for r in held}
    passed = {k: [flags[r["id"]] for r in held if kind(r) == k] for k in ("coherent", "loop", "gibberish")}
    rates = {k: (sum(v) / len(v) if v else None, len(v)) for k, v in passed.items()}
    write_json(OUT / "results.json", {"model": model.__dict__, "heldout": results, "flag_rates": rates})
    lines = ["# Fluency measure on the real-answer set's held-out third", "",
             "Made by `python experiments/fluency.py --write`; fitted on questions 0–6, measured once on 7–9.", "",
             "| measure | all broken AUROC [95% CI] | loops | gibberish |", "|---|---|---|---|"]
    for res in results:
        cells = [("—" if res[k] is None else f"{res[k]['auroc']:.3f} [{res[k]['ci'][0]:.2f}, {res[k]['ci'][1]:.2f}]"
                  f" (n {res[k]['n_broken']}/{res[k]['n_coherent']})") for k in ("all", "loops", "gibberish")]
        lines.append(f"| {res['measure']} | " + " | ".join(cells) + " |")
    lines += ["", f"Flagged fluent at threshold {model.threshold:.3f} (held-out): "
              + ", ".join(f"{k} {v[0]:.0%} of {v[1]}" for k, v in rates.items() if v[0] is not None), "",
              "Features (standardised) and weights: "
              + ", ".join(f"{k} {c:+.2f}" for k, c in zip(FLUENCY_FEATURES, model.coef, strict=True))]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
