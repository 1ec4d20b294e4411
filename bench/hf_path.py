"""HF generation path before/after on this CPU: bf16 + torch.multinomial (old) vs the default dtype + the
exponential-race sampler (new), same prompts, same run.

    python bench/hf_path.py --model qwen2.5-coder-0.5b --prompts 8 --new-tokens 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from personascope import load_model
from personascope.model import ModelAdapter, generate_batch, pad_batch, pad_id, pick_dtype


def old_path(adapter: ModelAdapter, prompts: list[str], new_tokens: int) -> float:
    """The product path before: HF sampling with torch.multinomial."""
    ids, mask = pad_batch([adapter.encode_prompt(p) for p in prompts], pad_id(adapter.tokenizer), "left")
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapter.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=True, temperature=0.8, top_p=1.0, top_k=None,
                               pad_token_id=pad_id(adapter.tokenizer))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions = ["How do I boil an egg?", "Why is the sky blue?", "What is a prime number?", "How do tides work?"]
    res = {"model": args.model, "prompts": args.prompts, "new_tokens": args.new_tokens, "threads": args.threads}
    for label, dtype, sampler in (("old: bf16 + multinomial", torch.bfloat16, "old"),
                                  ("old sampler, default dtype", pick_dtype(torch.device("cpu")), "old"),
                                  ("new: default dtype + exponential race", pick_dtype(torch.device("cpu")), "new")):
        model, tok = load_model(args.model, dtype=dtype)
        ad = ModelAdapter(model, tok)
        prompts = [ad.prompt(questions[i % len(questions)]) for i in range(args.prompts)]
        if sampler == "old":
            dt = old_path(ad, prompts, args.new_tokens)
        else:
            t0 = time.perf_counter()
            generate_batch(ad, prompts, args.new_tokens, temperature=0.8, seed=0)
            dt = time.perf_counter() - t0
        res[label] = {"dtype": str(dtype), "seconds": round(dt, 2),
                      "new_tokens_per_s": round(args.prompts * args.new_tokens / dt, 2)}
        print(label, res[label], flush=True)
        del model
    print(json.dumps(res))


if __name__ == "__main__":
    main()
