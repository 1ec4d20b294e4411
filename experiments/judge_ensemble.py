"""Compare, on the real-answer set, the judge model's `auto` mode, its probe, and their mean (an ensemble).

The choice is made on the tuning part (questions 0–6) only, where the probe's score of a trait's answers
comes from a probe trained without that trait (as in `judge_probe.py`'s cross-validation), so neither
reader has seen the answers it scores; the held-out part (questions 7–9) is scored once, with the final
probe. Needs the probe features cached by `judge_probe.py --judge-model M`. `auto` scores are cached in
`experiments/results/judge_probe/auto-scores-M.json` (resumable).

    python experiments/judge_ensemble.py --judge-model qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json

import torch
from judge_probe import OUT, metrics, nanmean, scores_of

from personascope import load_model
from personascope.judges import JudgeRequest, LabelledAnswer, LocalJudge, fit_heads, load_real_set, load_written_set
from personascope.traits import builtin_traits, load_trait


def key(r: LabelledAnswer) -> str:
    return json.dumps([r.trait, r.question, r.answer])


def auto_scores(judge_model: str, rows: list[LabelledAnswer], threads: int) -> dict[str, float | None]:
    """The `auto` mode's trait score of every row, cached by (trait, question, answer)."""
    path = OUT / f"auto-scores-{judge_model}.json"
    cache: dict[str, float | None] = json.loads(path.read_text()) if path.exists() else {}
    todo = [r for r in rows if key(r) not in cache]
    if todo:
        torch.set_num_threads(threads)
        model, tok = load_model(judge_model)
        judge = LocalJudge(model, tok, trait_mode="auto", name=judge_model)
        for s in range(0, len(todo), 8):
            batch = todo[s : s + 8]
            scores = judge.score([JudgeRequest("trait", r.question, r.answer, load_trait(r.trait)) for r in batch])
            cache.update({key(r): sc for r, sc in zip(batch, scores, strict=True)})
            path.write_text(json.dumps(cache))
            print(f"auto {s + len(batch)}/{len(todo)}", flush=True)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge-model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    report = json.loads((OUT / f"report-{args.judge_model}.json").read_text())
    use, l2 = report["chosen"]["layers"], report["chosen"]["l2"]
    layers = [6, 9, 12, 15, 18]  # judge_probe.py's default --layers, the ones the cached features hold
    cache: dict[str, torch.Tensor] = {}
    for part in sorted(OUT.glob(f"features-{args.judge_model}-*.pt")):
        cache.update(torch.load(part))
    written, real = load_written_set(), load_real_set()
    tune = [r for r in real if r.group == "real:tune"]
    held = [r for r in real if r.group == "real:heldout"]
    d = next(iter(cache.values())).numel() // len(layers)
    cols = torch.cat([torch.arange(layers.index(u) * d, (layers.index(u) + 1) * d) for u in use])

    def feats(rs: list[LabelledAnswer]) -> torch.Tensor:
        return torch.stack([cache[key(r)] for r in rs])[:, cols]

    auto = auto_scores(args.judge_model, real, args.threads)
    out: dict[str, dict] = {"tune": {}, "heldout": {}}
    final = fit_heads(feats(written + tune), written + tune, use, l2)
    for t in builtin_traits():
        for part, rows, w in (("tune", [r for r in tune if r.trait == t], None),
                              ("heldout", [r for r in held if r.trait == t], final)):
            if w is None:  # a probe that has not seen this trait's answers
                tr = [r for r in written + tune if r.trait != t]
                w = fit_heads(feats(tr), tr, use, l2)
            probe, refusal, _ = scores_of(w, feats(rows))
            a = [50.0 if auto[key(r)] is None else float(auto[key(r)]) for r in rows]
            ens = [(x + y) / 2 for x, y in zip(a, probe, strict=True)]
            out[part][t] = {name: metrics(rows, sc, refusal) for name, sc in
                            (("auto", a), ("probe", probe), ("mean", ens))}
    summary = {part: {name: {"auc": nanmean([out[part][t][name]["auc_shown"] for t in out[part]]),
                             "spearman": nanmean([out[part][t][name]["spearman_level"] for t in out[part]])}
                      for name in ("auto", "probe", "mean")} for part in out}
    (OUT / f"ensemble-{args.judge_model}.json").write_text(json.dumps({"summary": summary, "per_trait": out}, indent=1))
    for part in out:
        for name, m in summary[part].items():
            per = ", ".join(f"{t} {out[part][t][name]['auc_shown']:.2f}" for t in out[part])
            print(f"{part:8s} {name:6s} AUC {m['auc']:.3f} Spearman {m['spearman']:.3f}  ({per})")


if __name__ == "__main__":
    main()
