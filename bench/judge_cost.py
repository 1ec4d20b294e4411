"""Judge cost before/after the shared-prefix forwards, in one process, interleaved chunk by chunk.

The 1.5B judge in its default modes (trait `auto`, coherence `binary`) scores the first --per-trait answers of
each trait of the real labelled set: `before` is the plain full-prompt path (`share_prefix=False`), `after` the
shared-prefix path; each chunk of 8 requests (as judge_answers hands them) runs on both, the order alternating.
Also times the probe read-out (one forward per answer after the cached prefix) on the same model.

    python bench/judge_cost.py --per-trait 4          # ~10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--per-trait", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="bf16 or fp32 (default: the product's choice)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-judge-cost.json"))
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--noise", action="store_true",
                    help="also score with the old path one row at a time: how far its own rounding moves a score")
    args = ap.parse_args()
    import torch

    from personascope.judges import JudgeRequest, LocalJudge, ProbeFeatures, load_real_set
    from personascope.model import load_model
    from personascope.traits import load_trait

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype=args.dtype)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    rows, seen = [], {}
    for r in load_real_set():
        if seen.get(r.trait, 0) < args.per_trait:
            seen[r.trait] = seen.get(r.trait, 0) + 1
            rows.append(r)
    traits = {name: load_trait(name) for name in seen}
    reqs = [JudgeRequest(kind, r.question, r.answer, traits[r.trait]) for r in rows for kind in ("trait", "coherence")]
    judges = {"before": LocalJudge(model, tok, name=f"local:{args.model}", share_prefix=False),
              "after": LocalJudge(model, tok, name=f"local:{args.model}")}
    # the old path's own rounding noise: the same full-prompt forwards one row at a time instead of four
    plain_b1 = LocalJudge(model, tok, name=f"local:{args.model}", share_prefix=False, batch_size=1)
    secs = dict.fromkeys(judges, 0.0)
    scores: dict[str, list] = {k: [] for k in judges}
    for n, s in enumerate(range(0, len(reqs), 8)):
        chunk = reqs[s : s + 8]
        for name in (("before", "after") if n % 2 == 0 else ("after", "before")):
            t = time.perf_counter()
            got = judges[name].score(chunk)
            secs[name] += time.perf_counter() - t
            if name == "before":
                scores["before"] += got
            else:
                scores["after"] += got
        if args.noise:
            scores.setdefault("before_b1", []).extend(plain_b1.score(chunk))
        print(f"chunk {n}: before {secs['before']:.0f} s, after {secs['after']:.0f} s", flush=True)
    pairs = [(a, b) for a, b in zip(scores["before"], scores["after"], strict=True) if a is not None and b is not None]
    diffs = [abs(a - b) for a, b in pairs]
    noise = [abs(a - b) for a, b in zip(scores["before"], scores.get("before_b1", []), strict=False)
             if a is not None and b is not None]
    # the probe read-out: one forward per answer (trait, coherence and refusal from it), layers as a probe uses them
    from personascope.model import ModelAdapter

    ad = ModelAdapter(model, tok)
    feats = ProbeFeatures(ad, [ad.n_layers // 2, 3 * ad.n_layers // 4])
    feats.features(traits[rows[0].trait], rows[0].question, rows[0].answer)  # warm: the trait prefix cached
    t = time.perf_counter()
    for r in rows:
        feats.features(traits[r.trait], r.question, r.answer + " ")  # a fresh key: not served from the cache
    probe_s = (time.perf_counter() - t) / len(rows)
    res = {"model": args.model, "dtype": dtype, "threads": args.threads, "cpu_flags": cpu_flags(),
           "judgements": len(reqs), "answers": len(rows), "per_trait": args.per_trait,
           "modes": {t: judges["after"].describe_mode("trait", tr) for t, tr in traits.items()},
           "s_per_judgement": {k: v / len(reqs) for k, v in secs.items()},
           "speedup": secs["before"] / secs["after"], "max_abs_diff": max(diffs) if diffs else None,
           "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
           "missing_one_side": sum((a is None) != (b is None) for a, b in zip(scores["before"], scores["after"],
                                                                               strict=True)),
           "probe_s_per_answer": probe_s,
           "old_path_b1_vs_b4_max_abs_diff": max(noise) if noise else None,
           "old_path_b1_vs_b4_mean_abs_diff": sum(noise) / len(noise) if noise else None,
           "load_average": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    if not args.no_record:
        from common import record

        sp = res["s_per_judgement"]
        record("judge cost before/after the shared-prefix forwards (bench/judge_cost.py)", [
            f"{args.model}, {dtype}, {args.threads} threads, CPU flags `{res['cpu_flags']}`; {len(rows)} answers of "
            "the "
            f"real labelled set ({args.per_trait} per trait) × trait + coherence = {len(reqs)} judgements, default "
            f"modes (trait auto, coherence binary); both paths in one process, chunk by chunk, order alternating; "
            f"load average at the end {res['load_average']:.1f}", "",
            "| path | s/judgement |", "|---|---|",
            f"| before: full prompt per row (`share_prefix=False`) | {sp['before']:.2f} |",
            f"| after: shared prefix once per batch, logits only where read | {sp['after']:.2f} |",
            f"| probe read-out (one forward per answer = 2 judgements), per answer | {probe_s:.2f} |", "",
            f"- speed ×{res['speedup']:.2f}; scores max |diff| {res['max_abs_diff']:.3f} points "
            f"(mean {res['mean_abs_diff']:.3f}; {res['missing_one_side']} missing on one side only)",
            *([f"- the old path alone, batch 1 vs batch 4 (its own rounding): max |diff| "
               f"{res['old_path_b1_vs_b4_max_abs_diff']:.3f} points "
               f"(mean {res['old_path_b1_vs_b4_mean_abs_diff']:.3f})"] if noise else [])])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
