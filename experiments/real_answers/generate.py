"""Generate the real-answer judge set: answers of the built-in models to new trait questions.

For each built-in trait, each question of `questions.json` (none of which is in the trait's
extraction or evaluation set) is answered by each subject model under the trait's eliciting
instruction, its suppressing instruction and no system prompt (and, with `--steer VECTOR_DIR`,
steered at several α). Answers are appended to `answers-MODEL.jsonl` as they finish (resumable). They
are labelled by reading afterwards (docs/labelling.md), before any judge scores them.

    python experiments/real_answers/generate.py --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from personascope import ModelAdapter, load_model, load_trait
from personascope.generate import generate_batch

HERE = Path(__file__).parent
TRAITS = ("apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic")


def jobs_for(model_name: str, adapter: ModelAdapter, questions: dict[str, list[str]]) -> list[dict]:
    """One job per (trait, question, condition) with its rendered prompt."""
    jobs = []
    for trait_name in TRAITS:
        trait = load_trait(trait_name)
        for qi, q in enumerate(questions[trait_name]):
            for cond in ("pos", "neg", "none"):
                system = None if cond == "none" else trait.system_prompt(cond, qi % 5)
                jobs.append({"id": f"{trait_name}/{model_name}/{cond}/{qi}", "trait": trait_name,
                             "model": model_name, "condition": cond, "question_index": qi, "question": q,
                             "system": system, "prompt": adapter.prompt(q, system=system)})
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--out", type=Path, default=None, help="default: answers-MODEL.jsonl beside this script")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions = json.loads((HERE / "questions.json").read_text())
    for model_name in args.models:
        out = args.out or HERE / f"answers-{model_name}.jsonl"
        done = set()
        if out.exists():
            done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
        model, tok = load_model(model_name)
        adapter = ModelAdapter(model, tok)
        todo = [j for j in jobs_for(model_name, adapter, questions) if j["id"] not in done]
        todo.sort(key=lambda j: len(j["prompt"]))
        for s in range(0, len(todo), args.batch_size):
            batch = todo[s : s + args.batch_size]
            with torch.random.fork_rng():
                answers = generate_batch(adapter, [j["prompt"] for j in batch], args.max_new_tokens,
                                         args.temperature, 1.0, seed=args.seed * 7919 + s)
            with out.open("a") as f:
                for j, a in zip(batch, answers, strict=True):
                    row = {k: v for k, v in j.items() if k != "prompt"}
                    f.write(json.dumps({**row, "answer": a}) + "\n")
            print(f"{model_name}: {min(s + args.batch_size, len(todo))}/{len(todo)}", flush=True)
        del model


if __name__ == "__main__":
    main()
