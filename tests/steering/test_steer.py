import pytest
import torch
from tiny import tiny_pair

from personascope.model.adapter import (
    ModelAdapter,
    block_output,
    pad_batch,
    pad_id,
    position_ids_for,
    with_block_output,
)
from personascope.steering.steer import Steerer, steer
from personascope.vectors.file import PersonaVector, VectorMismatchError


def _batch(a: ModelAdapter):
    prompts = [a.prompt("hello there, how are you today?"), a.prompt("hi"), a.prompt("what is two plus two")]
    return pad_batch([a.encode_prompt(p) for p in prompts], pad_id(a.tokenizer), "left")


def _generate(a, ids, mask, n=4):
    out = a.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=pad_id(a.tokenizer), output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)  # [B, n, V]


def _reference_logits(a, seqs, mask0, layer, v, coef, pos_mask_fn, n):
    """No cache: full forward for every step, adding coef*v by hand at the intended positions."""
    t0 = mask0.shape[1]
    steps = []
    for k in range(n):
        ids = seqs[:, : t0 + k]
        mask = torch.cat([mask0, torch.ones(len(seqs), k, dtype=torch.long)], 1)
        pm = pos_mask_fn(t0, t0 + k).float()

        def hook(m, i, o):
            h = block_output(o)
            return with_block_output(o, h + coef * pm.view(1, -1, 1) * v)

        hd = a.blocks[layer - 1].register_forward_hook(hook)
        try:
            logits = a.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                             use_cache=False).logits
        finally:
            hd.remove()
        steps.append(logits[:, -1])
    return torch.stack(steps, 1)


POS_MASKS = {
    "all": lambda t0, t: torch.ones(t, dtype=torch.bool),
    "prompt": lambda t0, t: torch.arange(t) < t0,
    "response": lambda t0, t: torch.arange(t) >= t0 - 1,
}


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_cached_generation_matches_uncached_reference(family, positions):
    model, tok = tiny_pair(family)
    a = ModelAdapter(model, tok)
    ids, mask = _batch(a)
    torch.manual_seed(1)
    v = torch.randn(a.hidden_size)
    layer, coef, n = 2, 4.0, 4
    with torch.no_grad(), steer(a, v, layer, coef, positions):
        seqs, logits = _generate(a, ids, mask, n)
    with torch.no_grad():
        ref = _reference_logits(a, seqs, mask, layer, v, coef, POS_MASKS[positions], n)
        plain = _generate(a, ids, mask, n)[1]
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()
    assert not torch.allclose(logits, plain, atol=1e-3)  # steering did something


def test_coefficient_zero_is_identity(qwen_tiny):
    ids, mask = _batch(qwen_tiny)
    with torch.no_grad():
        plain = qwen_tiny.model(input_ids=ids, attention_mask=mask).logits
        with steer(qwen_tiny, torch.randn(qwen_tiny.hidden_size), 1, 0.0, "all"):
            steered = qwen_tiny.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, steered)


def test_per_row_coefficients_match_separate_runs(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v = torch.randn(a.hidden_size)
    coefs = torch.tensor([0.0, 3.0, -3.0])
    with torch.no_grad():
        with steer(a, v, 2, coefs, "all"):
            both = a.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits
        for row, c in enumerate(coefs.tolist()):
            with steer(a, v, 2, c, "all"):
                one = a.model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1],
                              position_ids=position_ids_for(mask[row : row + 1])).logits
            assert torch.allclose(both[row], one[0], atol=1e-5)


def test_ablation_leaves_activations_orthogonal(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v = torch.randn(a.hidden_size)
    seen = {}
    with torch.no_grad(), steer(a, v, 2, positions="all", mode="ablate"):
        # a hook registered after the steering hook sees the ablated output
        hd = a.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("h", block_output(o)))
        a.model(input_ids=ids, attention_mask=mask)
        hd.remove()
    proj = seen["h"] @ (v / v.norm())
    assert proj.abs().max() < 1e-4


def test_several_vectors_and_layers_at_once(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v1, v2 = torch.randn(a.hidden_size), torch.randn(a.hidden_size)
    with torch.no_grad():
        with Steerer(a).add(v1, 1, 2.0, "all").add(v2, 3, -1.0, "all"):
            both = a.model(input_ids=ids, attention_mask=mask).logits
        with steer(a, v1, 1, 2.0, "all"), steer(a, v2, 3, -1.0, "all"):
            nested = a.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(both, nested, atol=1e-6)


def test_layer_zero_steers_the_embedding_output(qwen_tiny):
    a = qwen_tiny
    ids, mask = _batch(a)
    v = torch.randn(a.hidden_size)
    with torch.no_grad():
        base = a.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with steer(a, v, 0, 1.5, "all"):
            h = a.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(h[0], base[0] + 1.5 * v, atol=1e-5)


def test_hooks_removed_after_exception(qwen_tiny):
    a = qwen_tiny
    n_before = sum(len(b._forward_hooks) for b in a.blocks) + len(a.model._forward_pre_hooks)
    with pytest.raises(RuntimeError), steer(a, torch.randn(a.hidden_size), 2, 1.0):
        raise RuntimeError("boom")
    n_after = sum(len(b._forward_hooks) for b in a.blocks) + len(a.model._forward_pre_hooks)
    assert n_after == n_before
    sd = {k: v.clone() for k, v in a.model.state_dict().items()}
    assert all(torch.equal(sd[k], v) for k, v in a.model.state_dict().items())


def test_bad_vectors_are_rejected_before_any_forward(qwen_tiny):
    a = qwen_tiny
    with pytest.raises(ValueError, match="needs \\(32,\\)"):
        steer(a, torch.randn(48), 1)
    with pytest.raises(ValueError, match="out of range"):
        steer(a, torch.randn(32), 9)
    other = PersonaVector({"response_avg": torch.randn(5, 64)}, None, {"trait": "evil", "model": "big"})
    with pytest.raises(VectorMismatchError, match="hidden size 64"):
        steer(a, other, 1)
