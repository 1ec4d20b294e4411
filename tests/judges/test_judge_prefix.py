"""The judge's shared-prefix forwards: the same scores as the plain full-prompt path, with fewer tokens run."""

import pytest
import torch
from tiny import tiny_pair

from personascope.judges.local import JudgeRequest, LocalJudge
from personascope.judges.prefix import PrefixForward
from personascope.model.adapter import ModelAdapter
from personascope.traits.trait import load_trait

ANSWERS = [("how are you today?", "fine, thanks, and the weather is lovely"), ("what is two plus two?", "four"),
           ("name a colour", "blue, like the sky on a clear day"), ("tell me a story", "once upon a time, a cat"),
           ("any advice?", "never give up"), ("ok?", "yes")]


@pytest.fixture
def tiny():
    model, tok = tiny_pair("qwen2", seed=1, initializer_range=0.3)
    return ModelAdapter(model, tok)


def requests():
    trait = load_trait("optimistic")
    return [JudgeRequest(kind, q, a, trait) for q, a in ANSWERS for kind in ("trait", "coherence")]


def test_shared_prefix_scores_equal_the_plain_path(tiny):
    reqs = requests()
    plain = LocalJudge(tiny.model, tiny.tokenizer, "contrastive", "logprob", share_prefix=False).score(reqs)
    shared = LocalJudge(tiny.model, tiny.tokenizer, "contrastive", "logprob", batch_size=3).score(reqs)
    assert None not in plain
    assert shared == pytest.approx(plain, abs=1e-3)


def test_shared_prefix_binary_probabilities_equal_the_plain_path(tiny):
    plain = LocalJudge(tiny.model, tiny.tokenizer, "binary", "binary", share_prefix=False)
    shared = LocalJudge(tiny.model, tiny.tokenizer, "binary", "binary", batch_size=3)
    prompts = [plain._judge_prompt(r, "binary") for r in requests()]
    assert torch.allclose(shared._last_token_probs(prompts), plain._last_token_probs(prompts), atol=1e-5)


def test_a_shared_rubric_runs_once_per_batch(tiny):
    calls: list[int] = []
    hook = tiny.model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].numel()),
                                                with_kwargs=True)
    judge = LocalJudge(tiny.model, tiny.tokenizer, "binary", "binary", batch_size=8)
    trait_reqs = [r for r in requests() if r.kind == "trait"]
    prompts = [judge._judge_prompt(r, "binary") for r in trait_reqs]
    full = sum(len(tiny.encode_prompt(p)) for p in prompts)
    try:
        judge.score(trait_reqs)
    finally:
        hook.remove()
    assert len(calls) == 2  # the rubric prefix once, then every row's rest in one batch
    assert sum(calls) < 0.8 * full


def test_prefix_forward_keeps_input_order_and_matches_single_rows(tiny):
    fwd = PrefixForward(tiny, batch_size=2)
    ids = [tiny.encode_prompt(tiny.prompt(f"{q} {a}", system="You grade answers carefully, one at a time."))
           for q, a in ANSWERS]
    got = fwd.last_token_probs(ids)
    for i, row in enumerate(ids):
        with torch.no_grad():
            want = tiny.model(input_ids=torch.tensor([row])).logits[0, -1].float().softmax(-1)
        assert torch.allclose(got[i], want, atol=1e-5)
