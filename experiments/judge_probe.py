"""Train and measure the probe judge on labelled answers; writes the shipped probe weights and a report.

Training data: the written labelled set (data/judge_eval) and the tuning part of the real-answer set
(data/judge_real, questions 0–6). Layers and regularisation are chosen by leave-one-trait-out
cross-validation on that data only. The held-out part (questions 7–9) is scored once, at the end,
per trait; the "new trait" path is measured by training without the trait and scoring its
held-out answers.

    python experiments/judge_probe.py --judge-model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from personascope import load_model
from personascope.judges import LabelledAnswer, ProbeFeatures, fit_heads, level_score, load_real_set, load_written_set
from personascope.model import ModelAdapter
from personascope.traits import builtin_traits, load_trait
from personascope.util import auroc, spearman

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "judge_probe"
WEIGHTS = ROOT / "src" / "personascope" / "data" / "judge_probe"


def nanmean(xs: list[float]) -> float:
    """Mean over the defined values (a trait with no shown answer has no AUC)."""
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def unlabelled_real() -> list[LabelledAnswer]:
    """Every generated real answer (labels unknown), so features can be computed while labelling goes on."""
    out = []
    for path in sorted((ROOT / "experiments" / "real_answers").glob("answers-*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.append(LabelledAnswer(r["trait"], r["question"], r["answer"], None, None, None, "real:unlabelled"))
    return out


def scores_of(weights, feats: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """(trait score, P(refusal), coherence) per row."""
    p = weights.probabilities(feats)
    trait = [level_score(float(a), float(b)) for a, b in zip(p["ge1"], p["ge2"], strict=True)]
    refusal = [float(x) for x in p["refusal"]] if "refusal" in p else [0.0] * len(trait)
    coh = [100 * (1 - float(x)) for x in p["incoherent"]] if "incoherent" in p else [float("nan")] * len(trait)
    return trait, refusal, coh


def metrics(rows: list[LabelledAnswer], trait: list[float], refusal: list[float]) -> dict:
    """AUC (shown vs rest, non-refusals), Spearman(level, score) over non-refusals, refusal accuracy, level means."""
    keep = [i for i, r in enumerate(rows) if r.level is not None and not r.refusal]
    shown = [int(rows[i].level == 2) for i in keep]
    lv = [rows[i].level for i in keep]
    sc = [trait[i] for i in keep]
    means = {name: (sum(s for s, v in zip(sc, lv, strict=True) if v == k) / max(1, lv.count(k)) if k in lv
                    else None) for k, name in ((0, "opposite"), (1, "neutral"), (2, "shown"))}
    ref = [i for i, r in enumerate(rows) if r.refusal is not None]
    acc = sum((refusal[i] >= 0.5) == bool(rows[i].refusal) for i in ref) / max(1, len(ref))
    return {"n": len(rows), "n_scored": len(keep), "auc_shown": auroc(sc, shown), "spearman_level": spearman(lv, sc),
            "refusal_accuracy": acc, "n_refusals": sum(bool(rows[i].refusal) for i in ref), "mean_by_level": means}


def _fmt(x) -> str:
    return "—" if x is None or x != x else f"{x:.2f}" if abs(x) <= 1 else f"{x:.0f}"


def write_markdown(report: dict, path: Path) -> None:
    """Per-trait tables for the held-out part, the new-trait path and leave-one-trait-out on all real answers."""
    lines = [f"# Probe judge on {report['judge_model']}", "",
             f"Chosen by leave-one-trait-out CV on tuning data: layers {report['chosen']['layers']}, "
             f"l2 {report['chosen']['l2']} (CV AUC {report['chosen']['loto_auc']:.3f}, "
             f"Spearman {report['chosen']['loto_spearman']:.3f}). "
             f"Feature time {report['seconds_per_answer_features'] or 0:.2f} s per answer "
             "(trait + coherence + refusal from one forward pass).", ""]
    for part, title in (("heldout", "Held-out real answers (questions 7–9), final probe"),
                        ("heldout_new_trait", "Held-out real answers, probe trained without the trait"),
                        ("loto_all_real", "All real answers of a trait, probe trained without the trait")):
        lines += [f"## {title}", "", "| trait | n | scored | AUC shown vs rest | Spearman level | refusal acc "
                  "| mean opposite / neutral / shown |", "|---|---|---|---|---|---|---|"]
        for t, m in report[part].items():
            mb = m["mean_by_level"]
            lines.append(f"| {t} | {m['n']} | {m['n_scored']} | {_fmt(m['auc_shown'])} | {_fmt(m['spearman_level'])} "
                         f"| {_fmt(m['refusal_accuracy'])} | {_fmt(mb['opposite'])} / {_fmt(mb['neutral'])} / "
                         f"{_fmt(mb['shown'])} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--judge-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--layers", default="6,9,12,15,18")
    ap.add_argument("--l2", default="0.03,0.3")
    ap.add_argument("--features-only", action="store_true", help="compute and cache features, then stop")
    ap.add_argument("--shard", default="0/1", help="I/N: compute every N-th row from I (with --features-only)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.judge_model)
    adapter = ModelAdapter(model, tok)
    layers = [int(x) for x in args.layers.split(",")]
    fx = ProbeFeatures(adapter, layers)
    traits = {t: load_trait(t) for t in builtin_traits()}
    written = load_written_set()
    real = load_real_set()
    tune = [r for r in real if r.group == "real:tune"]
    held = [r for r in real if r.group == "real:heldout"]
    rows = written + tune + held + unlabelled_real()
    shard, n_shards = (int(x) for x in args.shard.split("/"))

    cache_path = OUT / f"features-{args.judge_model}-{shard}.pt"
    cache: dict[str, torch.Tensor] = {}
    for part in sorted(OUT.glob(f"features-{args.judge_model}-*.pt")):
        cache.update(torch.load(part))
    t0, made = time.time(), 0
    for i, r in enumerate(rows):
        if args.features_only and i % n_shards != shard:
            continue
        key = json.dumps([r.trait, r.question, r.answer])
        if key not in cache:
            cache[key] = fx.features(traits.get(r.trait), r.question, r.answer)
            made += 1
            if made % 20 == 0:
                torch.save(cache, cache_path)
                print(f"features {i + 1}/{len(rows)} ({(time.time() - t0) / made:.2f} s/answer)", flush=True)
    torch.save(cache, cache_path)
    if args.features_only:
        return
    sec_per_answer = (time.time() - t0) / made if made else None
    d = adapter.hidden_size

    def feats(rs: list[LabelledAnswer], use: list[int]) -> torch.Tensor:
        cols = torch.cat([torch.arange(layers.index(u) * d, (layers.index(u) + 1) * d) for u in use])
        return torch.stack([cache[json.dumps([r.trait, r.question, r.answer])] for r in rs])[:, cols]

    train_pool = written + tune
    candidates = [[x] for x in layers] + [list(p) for p in itertools.pairwise(layers)]
    l2s = [float(x) for x in args.l2.split(",")]
    cv = []
    for use, l2 in itertools.product(candidates, l2s):
        per = []
        for t in traits:
            tr = [r for r in train_pool if r.trait != t]
            te = [r for r in tune if r.trait == t]
            w = fit_heads(feats(tr, use), tr, use, l2)
            sc, rf, _ = scores_of(w, feats(te, use))
            per.append(metrics(te, sc, rf))
        mean_auc = nanmean([m["auc_shown"] for m in per])
        mean_rho = nanmean([m["spearman_level"] for m in per])
        cv.append({"layers": use, "l2": l2, "loto_auc": mean_auc, "loto_spearman": mean_rho,
                   "loto_refusal": sum(m["refusal_accuracy"] for m in per) / len(per)})
        print(f"cv layers={use} l2={l2}: AUC {mean_auc:.3f} rho {mean_rho:.3f}", flush=True)
    best = max(cv, key=lambda c: c["loto_auc"] + c["loto_spearman"])
    use, l2 = best["layers"], best["l2"]

    final = fit_heads(feats(train_pool, use), train_pool, use, l2,
                      {"judge_model": args.judge_model, "trained_on": "written + real:tune",
                       "l2": str(l2), "prompt_version": "1"})
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    final.save(WEIGHTS / f"{args.judge_model}.safetensors")

    report = {"judge_model": args.judge_model, "chosen": best, "seconds_per_answer_features": sec_per_answer,
              "heldout": {}, "heldout_new_trait": {}, "cv": cv}
    for t in traits:
        te = [r for r in held if r.trait == t]
        sc, rf, _ = scores_of(final, feats(te, use))
        report["heldout"][t] = metrics(te, sc, rf)
        tr = [r for r in train_pool if r.trait != t]
        w = fit_heads(feats(tr, use), tr, use, l2)
        sc2, rf2, _ = scores_of(w, feats(te, use))
        report["heldout_new_trait"][t] = metrics(te, sc2, rf2)
    # the new-trait path on all real answers: train without trait T (written + real), score every real answer of T
    report["loto_all_real"] = {}
    for t in traits:
        tr = [r for r in written + tune + held if r.trait != t]
        te = [r for r in tune + held if r.trait == t]
        w = fit_heads(feats(tr, use), tr, use, l2)
        sc3, rf3, _ = scores_of(w, feats(te, use))
        report["loto_all_real"][t] = metrics(te, sc3, rf3)
    (OUT / f"report-{args.judge_model}.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, OUT / f"report-{args.judge_model}.md")
    for part in ("heldout", "heldout_new_trait", "loto_all_real"):
        ms = report[part].values()
        print(part, "mean AUC", nanmean([m["auc_shown"] for m in ms]), "mean rho",
              nanmean([m["spearman_level"] for m in ms]), "refusal acc", nanmean([m["refusal_accuracy"] for m in ms]))


if __name__ == "__main__":
    main()
