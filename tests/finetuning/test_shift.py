import copy

import pytest
import torch
from tiny import tiny_pair

from personascope.finetuning.shift import finetuning_shift, shift_from_activations
from personascope.model.activations import last_token_activations
from personascope.model.adapter import ModelAdapter, block_output, with_block_output
from personascope.traits.trait import load_trait
from personascope.vectors.file import PersonaVector, base_metadata


def _vector(a: ModelAdapter, layer: int | None = None) -> PersonaVector:
    v = torch.randn(a.n_layers + 1, a.hidden_size, generator=torch.Generator().manual_seed(5))
    meta = base_metadata(a, "optimistic")
    if layer is not None:
        meta["best_layer"] = str(layer)
    return PersonaVector({"response_avg": v}, torch.ones(a.n_layers + 1), meta)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_shift_of_a_model_against_itself_is_zero(family):
    a = ModelAdapter(*tiny_pair(family))
    res = finetuning_shift(a, a, load_trait("optimistic"), _vector(a, 2), n_questions=4)
    assert res.layer == 2 and res.n_prompts == 4 and len(res.per_layer) == a.n_layers + 1
    assert res.shift == 0 and all(x == 0 for x in res.per_layer)


@pytest.mark.parametrize("layer", [1, 2])
def test_shift_equals_projection_of_a_known_perturbation(layer):
    model, tok = tiny_pair("qwen2", seed=1)
    base = ModelAdapter(model, tok)
    perturbed = ModelAdapter(copy.deepcopy(model), tok)
    u = torch.randn(base.hidden_size, generator=torch.Generator().manual_seed(9))
    # the "finetuned" model: block layer-1 writes u more into the residual stream at every position
    perturbed.blocks[layer - 1].register_forward_hook(
        lambda m, args, out: with_block_output(out, block_output(out) + u))
    pv = _vector(base)
    res = finetuning_shift(base, perturbed, load_trait("sycophantic"), pv, layer=layer)
    v = pv.vector(layer)
    want = float(u @ v / v.norm())
    assert res.shift == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert all(x == pytest.approx(want, rel=1e-4, abs=1e-4) for x in res.per_prompt)
    assert all(x == 0 for x in res.per_layer[:layer])  # nothing below the perturbed block moved
    assert res.n_prompts == len(load_trait("sycophantic").eval_questions)


def test_shift_from_precomputed_activations_matches():
    a = ModelAdapter(*tiny_pair("llama", seed=2))
    b = ModelAdapter(*tiny_pair("llama", seed=3))
    trait = load_trait("optimistic")
    pv = _vector(a, 1)
    prompts = [a.prompt(q) for q in trait.eval_questions[:3]]
    acts_a, acts_b = last_token_activations(a, prompts), last_token_activations(b, prompts)
    pre = shift_from_activations(acts_a, acts_b, pv, 1)
    direct = finetuning_shift(a, b, trait, pv, n_questions=3)
    assert pre.per_layer == pytest.approx(direct.per_layer, abs=1e-6) and pre.shift != 0
    # one prompt by hand: (a_ft − a_base) · v̂ at the last prompt token of layer 1
    with torch.no_grad():
        ids = torch.tensor([a.encode_prompt(prompts[0])])
        ha = a.model(ids, output_hidden_states=True).hidden_states[1][0, -1]
        hb = b.model(ids, output_hidden_states=True).hidden_states[1][0, -1]
    v = pv.vector(1)
    assert pre.per_prompt[0] == pytest.approx(float((hb - ha) @ v / v.norm()), abs=1e-4)


def test_shift_rejects_a_vector_of_another_model():
    a = ModelAdapter(*tiny_pair("qwen2"))
    other = ModelAdapter(*tiny_pair("qwen2", hidden_size=16, intermediate_size=32))
    with pytest.raises(ValueError, match="hidden size"):
        finetuning_shift(a, a, load_trait("optimistic"), _vector(other))
