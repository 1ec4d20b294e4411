"""Which extraction settings give valid vectors on a built-in model? Measured on the builtin run folders.

From each trait's answers (experiments/vectors/build.py) the vector is rebuilt under variants — the pair filter
(the paper's 50/50 thresholds, a 20-point pos − neg margin, every pair), the number of extraction questions
(5 / 10 / 20) and the answer length read (the first 16 / 32 / 64 tokens) — and each is checked with the validity
report at its chosen layer. Forward passes only; writes experiments/results/vectors/settings-MODEL.{md,json}.

    python experiments/vectors/settings.py [--model qwen2.5-coder-0.5b] [--traits ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from personascope.judges import ProbeJudge, ProbeWeights, probe_weights_path
from personascope.model import ModelAdapter, forward_with_residual_hooks, load_model, pad_batch, pad_id
from personascope.traits import builtin_traits, load_trait
from personascope.util import read_jsonl, write_json
from personascope.vectors import (
    PROFILES,
    ValidityReport,
    choose_layer,
    filter_pairs,
    held_out_auroc,
    label_curves,
    label_probe,
    ladder_curve,
    ladder_probe,
    score_answers,
    split_half_cosine,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "experiments" / "results" / "vectors"
LENGTHS = (16, 32, 64)
METRICS = ("held_out_auroc", "split_half_cosine", "ladder_spearman", "label_auroc", "label_spearman")


@torch.no_grad()
def response_averages(adapter: ModelAdapter, answers: list[dict], lengths: tuple[int, ...] = LENGTHS,
                      batch_size: int = 16) -> dict[int, torch.Tensor]:
    """{n: [N, L + 1, d]} response averages over each answer's first n tokens, read as in extraction, from one
    forward per batch (a causal model's first n positions do not depend on what follows them)."""
    items = [adapter.encode_pair(adapter.prompt(r["question_text"], r["system"]), r["answer"]) for r in answers]
    n_layers = adapter.n_layers + 1
    out = {n: torch.zeros(len(items), n_layers, adapter.hidden_size) for n in lengths}
    order = sorted(range(len(items)), key=lambda i: sum(map(len, items[i])))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([items[i][0] + items[i][1] for i in idx], pad_id(adapter.tokenizer), "right")
        masks = {}
        for n in lengths:
            m = torch.zeros(ids.shape)
            for row, i in enumerate(idx):
                p, a = len(items[i][0]), len(items[i][1])
                m[row, p:p + min(n, a)] = 1
            masks[n] = m / m.sum(1, keepdim=True).clamp(min=1)

        def reduce(slot: int, h: torch.Tensor, idx=idx, masks=masks) -> None:
            for n, m in masks.items():
                out[n][idx, slot] = torch.einsum("bt,btd->bd", m, h.float().cpu())

        forward_with_residual_hooks(adapter, list(range(n_layers)), reduce, ids, mask)
    return out


def check(pos, neg, qs, ladder, labels) -> dict:
    v = pos.mean(0) - neg.mean(0)
    au, sp = label_curves(labels, v) if labels else (None, None)
    rep = ValidityReport(list(range(v.shape[0])), held_out_auroc(pos, neg, qs), split_half_cosine(pos, neg, qs),
                         ladder_curve(ladder, v) if ladder else None, au, sp)
    rep.layer = choose_layer(rep)
    return {"layer": rep.layer, "pairs": len(pos), **rep.at(), "valid": rep.valid}


def trait_variants(adapter, judge, name: str, model: str) -> dict:
    trait = load_trait(name)
    run = ROOT / "runs" / f"{name}-{model}-builtin"
    cfg = PROFILES["builtin"]
    answers = list(read_jsonl(run / "answers.jsonl"))
    scored = score_answers(judge, trait, answers, run, cfg)
    index = {(r["side"], r["instruction"], r["question"], r["sample"]): i for i, r in enumerate(scored)}
    acts = response_averages(adapter, scored)
    ladder, labels = ladder_probe(adapter, trait), label_probe(adapter, name)
    out = {}

    def run_variant(label: str, filt: str, n_q: int, n_tok: int) -> None:
        kept = filter_pairs(scored, replace(cfg, filter=filt)).kept
        kept = [(p, n) for p, n in kept if p["question"] < n_q]
        if len({p["question"] for p, _ in kept}) < 2:
            out[label] = {"pairs": len(kept), "note": "fewer than 2 questions kept"}
            return
        ip = [index[("pos", p["instruction"], p["question"], p["sample"])] for p, _ in kept]
        ineg = [index[("neg", n["instruction"], n["question"], n["sample"])] for _, n in kept]
        out[label] = check(acts[n_tok][ip], acts[n_tok][ineg], [p["question"] for p, _ in kept], ladder, labels)

    for filt in ("threshold", "margin", "none"):
        run_variant(f"filter {filt}", filt, 20, 64)
    for n_q in (5, 10):
        run_variant(f"{n_q} questions", "none", n_q, 64)
    for n_tok in (16, 32):
        run_variant(f"first {n_tok} tokens", "none", 20, n_tok)
    return out


def fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--traits", nargs="*", default=builtin_traits())
    args = ap.parse_args()
    t0 = time.time()
    model, tok = load_model(args.model)
    adapter = ModelAdapter(model, tok)
    judge = ProbeJudge(adapter, ProbeWeights.load(probe_weights_path(args.model)), name=f"probe:{args.model}")
    results = {}
    for name in args.traits:
        if (ROOT / "runs" / f"{name}-{args.model}-builtin" / "answers.jsonl").exists():
            results[name] = trait_variants(adapter, judge, name, args.model)
            print(name, json.dumps(results[name]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / f"settings-{args.model}.json", results)
    variants = list(next(iter(results.values())))
    lines = [f"# Extraction settings on {args.model} (experiments/vectors/settings.py)", "",
             f"{len(results)} traits; the answers of the `builtin` profile (20 questions × 5 instruction pairs, "
             "64 tokens, T 0.8, one sample), re-read under each variant; every check at the variant's chosen "
             f"layer; mean over traits (min–max). {time.time() - t0:.0f} s.", "",
             "| variant | pairs | " + " | ".join(m.replace("_", " ") for m in METRICS) + " | valid traits |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for var in variants:
        rows = [r[var] for r in results.values() if "layer" in r[var]]
        cells = [f"{statistics.fmean(r['pairs'] for r in rows):.0f}" if rows else "—"]
        for m in METRICS:
            vals = [r[m] for r in rows if r.get(m) is not None]
            cells.append(f"{statistics.fmean(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})" if vals else "—")
        cells.append(f"{sum(r['valid'] for r in rows)}/{len(results)}")
        lines.append(f"| {var} | " + " | ".join(cells) + " |")
    lines += ["", "Per trait:", "", "| trait | variant | layer | pairs | " + " | ".join(METRICS) + " |",
              "|---|---|---|---|" + "---|" * len(METRICS)]
    for name, res in results.items():
        for var, r in res.items():
            lines.append(f"| {name} | {var} | {fmt(r.get('layer'))} | {r['pairs']} | "
                         + " | ".join(fmt(r.get(m)) for m in METRICS) + " |")
    (OUT / f"settings-{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
