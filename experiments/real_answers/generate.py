"""Generate the real-answer judge set: answers of the built-in models to new trait questions.

For each built-in trait, each question of `questions.json` (none of which is in the trait's
extraction or evaluation set) is answered by each subject model under the trait's eliciting
instruction, its suppressing instruction and no system prompt, and (with `--steer ALPHA ...`) with no
system prompt, steered along the model's ready-made persona vector at each relative α on the response
positions. Answers are appended to `answers-MODEL.jsonl` as they finish (resumable). They are labelled
by reading afterwards (docs/labelling.md), before any judge scores them.

    python experiments/real_answers/generate.py --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    python experiments/real_answers/generate.py --models qwen2.5-coder-0.5b --steer 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from personascope import load_model, load_trait
from personascope.model import ModelAdapter, generate_batch
from personascope.steering import Steerer
from personascope.vectors import load_vector

HERE = Path(__file__).parent
TRAITS = ("apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic")


def jobs_for(model_name: str, adapter: ModelAdapter, questions: dict[str, list[str]],
             alphas: list[float] | None = None, tag: str = "steer") -> list[dict]:
    """One job per (trait, question, condition) with its rendered prompt: the three system-prompt conditions,
    or, given alphas, one steered condition per α (no system prompt), named `tag`+α."""
    conds = [f"{tag}{a:+g}" for a in alphas] if alphas else ["pos", "neg", "none"]
    jobs = []
    for trait_name in TRAITS:
        trait = load_trait(trait_name)
        for qi, q in enumerate(questions[trait_name]):
            for cond in conds:
                steered = alphas is not None
                system = None if cond == "none" or steered else trait.system_prompt(cond, qi % 5)
                alpha = float(cond[len(tag):]) if steered else None
                jobs.append({"id": f"{trait_name}/{model_name}/{cond}/{qi}", "trait": trait_name,
                             "model": model_name, "condition": cond, "alpha": alpha, "question_index": qi,
                             "question": q, "system": system, "prompt": adapter.prompt(q, system=system)})
    return jobs


def steering_for(adapter: ModelAdapter, model_name: str, batch: list[dict]) -> Steerer | None:
    """A Steerer adding each row's trait vector at its α (response positions, the vector's own layer);
    None for an unsteered batch. Rows of different traits share one layer only if their vectors do, so
    steered batches hold one trait each (see `batches`)."""
    if batch[0]["alpha"] is None:
        return None
    pv = load_vector(batch[0]["trait"], batch[0]["trait"], model_name)
    layer = pv.default_layer()
    coefs = torch.tensor([pv.coef_from_alpha(j["alpha"], layer) for j in batch])
    return Steerer(adapter).add(pv, layer, coefs, "response")


def batches(todo: list[dict], size: int) -> list[list[dict]]:
    """Batches of similar prompt length; steered jobs grouped by trait (one vector per batch)."""
    groups: dict[str | None, list[dict]] = {}
    for j in sorted(todo, key=lambda j: len(j["prompt"])):
        groups.setdefault(j["trait"] if j["alpha"] is not None else None, []).append(j)
    return [g[s : s + size] for g in groups.values() for s in range(0, len(g), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--out", type=Path, default=None, help="default: answers-MODEL.jsonl beside this script")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core machine)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steer", nargs="+", type=float, default=None, metavar="ALPHA",
                    help="steered answers instead (no system prompt), one per relative α, along the model's "
                         "ready-made vector of each trait")
    ap.add_argument("--greedy", action="store_true",
                    help="greedy decoding (as the demo steers), conditions named greedy±α; implies --temperature 0")
    args = ap.parse_args()
    if args.greedy:
        args.temperature = 0.0
    torch.set_num_threads(args.threads)
    questions = json.loads((HERE / "questions.json").read_text())
    for model_name in args.models:
        out = args.out or HERE / f"answers-{model_name}.jsonl"
        done = set()
        if out.exists():
            done = {json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()}
        model, tok = load_model(model_name)
        adapter = ModelAdapter(model, tok)
        todo = [j for j in jobs_for(model_name, adapter, questions, args.steer,
                                                        "greedy" if args.greedy else "steer") if j["id"] not in done]
        finished = 0
        for s, batch in enumerate(batches(todo, args.batch_size)):
            steerer = steering_for(adapter, model_name, batch)
            with torch.random.fork_rng():
                if steerer is None:
                    answers = generate_batch(adapter, [j["prompt"] for j in batch], args.max_new_tokens,
                                             args.temperature, 1.0, seed=args.seed * 7919 + s)
                else:
                    with steerer:
                        answers = generate_batch(adapter, [j["prompt"] for j in batch], args.max_new_tokens,
                                                 args.temperature, 1.0, seed=args.seed * 7919 + s)
            with out.open("a") as f:
                for j, a in zip(batch, answers, strict=True):
                    row = {k: v for k, v in j.items() if k != "prompt"}
                    f.write(json.dumps({**row, "answer": a}) + "\n")
            finished += len(batch)
            print(f"{model_name}: {finished}/{len(todo)}", flush=True)
        del model


if __name__ == "__main__":
    main()
