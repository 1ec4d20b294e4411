"""Does the judge read the question's formatting instruction? Judge the same answers against the question
with and without an appended suffix ("Answer in a few sentences.") and compare the trait scores.

    python experiments/judge_suffix.py --trait optimistic --n 20     # ~5 min on 2 CPU cores

The answers are the model's own (T 0.7, up to 96 tokens) to the trait's extraction questions with the suffix,
half under the eliciting instruction and half with no system prompt; results and the answers with both scores
go to experiments/results/judge_suffix/TRAIT.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from personascope.judges import JudgeRequest, make_judge
from personascope.model import DEFAULT_MODEL, ModelAdapter, SamplingConfig, generate_batch, load_model
from personascope.traits import load_trait
from personascope.util import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trait", default="optimistic")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--judge-model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--suffix", default=" Answer in a few sentences.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "judge_suffix")
    args = ap.parse_args()
    trait = load_trait(args.trait)
    model, tok = load_model(args.model)
    adapter = ModelAdapter(model, tok)
    qs = [trait.extract_questions[i % len(trait.extract_questions)] for i in range(args.n)]
    systems = [trait.system_prompt("pos", i % len(trait.instructions)) if i % 2 == 0 else None
               for i in range(args.n)]
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=96, seed=args.seed)
    answers = generate_batch(adapter, [adapter.prompt(q + args.suffix, s) for q, s in zip(qs, systems, strict=True)],
                             cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
    judge = make_judge(args.judge_model, None, None, None)
    with_suffix = judge.score([JudgeRequest("trait", q + args.suffix, a, trait) for q, a in zip(qs, answers,
                                                                                               strict=True)])
    without = judge.score([JudgeRequest("trait", q, a, trait) for q, a in zip(qs, answers, strict=True)])
    pairs = [(w, o) for w, o in zip(with_suffix, without, strict=True) if w is not None and o is not None]
    diffs = [o - w for w, o in pairs]
    res = {"trait": args.trait, "judge": judge.name, "suffix": args.suffix, "n": len(pairs),
           "mean_with_suffix": statistics.mean(w for w, _ in pairs),
           "mean_without": statistics.mean(o for _, o in pairs),
           "mean_difference": statistics.mean(diffs), "max_abs_difference": max(map(abs, diffs)),
           "sd_difference": statistics.stdev(diffs) if len(diffs) > 1 else None,
           "rows": [{"question": q, "system": s, "answer": a, "with_suffix": w, "without": o}
                    for q, s, a, w, o in zip(qs, systems, answers, with_suffix, without, strict=True)]}
    write_json(args.out / f"{args.trait}.json", res)
    print(f"{judge.name}, {len(pairs)} answers: mean trait {res['mean_with_suffix']:.1f} with the suffix, "
          f"{res['mean_without']:.1f} without (difference {res['mean_difference']:+.1f} ± {res['sd_difference']:.1f} "
          f"sd, max |diff| {res['max_abs_difference']:.1f})")


if __name__ == "__main__":
    main()
