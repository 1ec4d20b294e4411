"""The judge's exact 0–100 answer distribution: P(the reply is the integer n) summed over digit-token paths.

No tokenizer here has single tokens for every integer 10–100, so the `0_100` and `fewshot` modes expand the
tree of digit prefixes with the KV cache and take the expectation over the integers.
"""

from __future__ import annotations

import copy
import re

import torch

from personascope.model import cache_kwarg, output_cache

MASS_THRESHOLD = 0.25

def _valid_prefix(s: str) -> bool:
    """Whether s starts some canonical integer string 0..100."""
    if not s or not s.isdigit():
        return False
    if s[0] == "0":
        return s == "0"
    return len(s) <= 2 or s == "100"


def _valid_number(s: str) -> bool:
    return _valid_prefix(s) and int(s) <= 100 and (s == "0" or s[0] != "0")


def digit_tokens(tokenizer) -> tuple[dict[int, str], dict[int, str]]:
    """(tokens usable first, tokens usable after a digit): id -> digit string.

    A first token may carry one leading space (" 42"); continuation tokens are pure digits.
    """
    first: dict[int, str] = {}
    cont: dict[int, str] = {}
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if re.fullmatch(r"\d+", text):
            first[tid] = cont[tid] = text
        elif re.fullmatch(r" \d+", text):
            first[tid] = text[1:]
    return first, cont


@torch.no_grad()
def integer_distribution(
    model,
    prompt_ids: list[int],
    first: dict[int, str],
    cont: dict[int, str],
    prune: float = 1e-5,
) -> dict[int, float]:
    """P(the answer is exactly the integer n, then a non-digit) for n in 0..100.

    Sums over every digit-token path that spells n, expanding the tree of digit
    prefixes with the KV cache; branches whose probability falls below `prune` are dropped
    (prune=0 is exact).
    """
    dev = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True, logits_to_keep=1)
    root_cache = output_cache(out)
    root_probs = out.logits[0, -1].float().softmax(-1)
    result: dict[int, float] = {}
    cont_ids = torch.tensor(sorted(cont), device=dev, dtype=torch.long)
    # frontier: (prefix string, path token ids, path probability)
    frontier = [(s, [tid], float(root_probs[tid])) for tid, s in first.items()
                if _valid_prefix(s) and float(root_probs[tid]) > prune]
    while frontier:
        by_len: dict[int, list] = {}
        for node in frontier:
            by_len.setdefault(len(node[1]), []).append(node)
        frontier = []
        for nodes in by_len.values():
            cache = copy.deepcopy(root_cache)
            cache.batch_repeat_interleave(len(nodes))
            ids = torch.tensor([n[1] for n in nodes], device=dev)
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
            probs = logits.float().softmax(-1)
            p_digit = probs[:, cont_ids].sum(-1) if len(cont_ids) else torch.zeros(len(nodes), device=dev)
            for row, (s, path, p) in enumerate(nodes):
                if _valid_number(s):
                    result[int(s)] = result.get(int(s), 0.0) + p * float(1 - p_digit[row])
                for tid, d in cont.items():
                    q = p * float(probs[row, tid])
                    if q > prune and _valid_prefix(s + d):
                        frontier.append((s + d, [*path, tid], q))
    return result


def expected_score(dist: dict[int, float], threshold: float = MASS_THRESHOLD) -> float | None:
    """Probability-weighted mean of the integers, or None when too little mass is on them."""
    mass = sum(dist.values())
    if mass < threshold:
        return None
    return sum(n * p for n, p in dist.items()) / mass
