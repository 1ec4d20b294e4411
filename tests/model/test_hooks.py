import pytest
import torch
from tiny import tiny_pair

from personascope.model.activations import collect_spans
from personascope.model.adapter import ModelAdapter, pad_batch, pad_id
from personascope.model.generate import generate_batch
from personascope.model.hooks import ResidualHooks, add_residual_hook
from personascope.monitor.trace import trace_generation
from personascope.steering.steer import DEFAULT_POSITIONS, Steerer, steer
from personascope.util.rng import seeded


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gpt_neox"])
def test_residual_hook_layer_l_reads_hidden_state_l(family):
    a = ModelAdapter(*tiny_pair(family))
    ids, mask = pad_batch([a.encode_prompt(a.prompt("hello"))], pad_id(a.tokenizer))
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        return lambda h: seen.__setitem__(layer, h.detach().clone())

    with torch.no_grad(), ResidualHooks(a, [(la, keep(la)) for la in range(a.n_layers + 1)]):
        hs = a.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # hidden_states[L] is after the final norm in most models, so compare rows 0 .. L - 1
    for layer in range(a.n_layers):
        assert torch.allclose(seen[layer], hs[layer], atol=1e-5), layer


def test_residual_hook_replaces_and_is_removed(qwen_tiny):
    a = qwen_tiny
    ids, mask = pad_batch([a.encode_prompt(a.prompt("hi"))], pad_id(a.tokenizer))
    with torch.no_grad():
        base = a.model(input_ids=ids, attention_mask=mask).logits
        handle = add_residual_hook(a, 2, lambda h: h * 0)
        zeroed = a.model(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        again = a.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base, zeroed)
    assert torch.equal(base, again)
    with pytest.raises(ValueError, match="out of range"):
        add_residual_hook(a, 9, lambda h: None)


def test_steer_and_steerer_add_share_default_positions(qwen_tiny):
    v = torch.randn(qwen_tiny.hidden_size)
    assert DEFAULT_POSITIONS == "response"
    assert steer(qwen_tiny, v, 1).specs[0].positions == Steerer(qwen_tiny).add(v, 1).specs[0].positions == "response"


def test_prompt_steering_applies_to_span_collection_after_generation(qwen_tiny):
    """The prefill flag is read at the model and at its base model: span collection (base model, no cache)
    after a cached generation is a prefill, so `prompt` steering applies to it like `all` does."""
    a = qwen_tiny
    v = torch.randn(a.hidden_size)
    items = [(a.encode_prompt(a.prompt("hello there")), a.tokenizer("ok then", add_special_tokens=False)["input_ids"])]
    with torch.no_grad():
        with steer(a, v, 1, 3.0, "all"):
            ref, _ = collect_spans(a, items, [2])
        with steer(a, v, 1, 3.0, "prompt"):
            generate_batch(a, [a.prompt("hi")], max_new_tokens=3, temperature=0)  # leaves a decode step last
            got, _ = collect_spans(a, items, [2])
        plain, _ = collect_spans(a, items, [2])
    assert torch.allclose(got["response_avg"], ref["response_avg"], atol=1e-5)
    assert not torch.allclose(plain["response_avg"], ref["response_avg"], atol=1e-3)


def test_select_rows_keeps_per_row_coefs(qwen_tiny):
    st = Steerer(qwen_tiny).add(torch.randn(qwen_tiny.hidden_size), 1, torch.tensor([1.0, 2.0, 3.0]))
    st.select_rows(torch.tensor([0, 2]))
    assert st.specs[0].coef.tolist() == [1.0, 3.0]
    st.set_specs([])
    assert st.specs == ()


def test_seeded_calls_do_not_reset_the_callers_rng(qwen_tiny):
    a = qwen_tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = generate_batch(a, [a.prompt("hi")], max_new_tokens=4, temperature=1.0, seed=7)
    trace_generation(a, [a.prompt("hi")], torch.randn(a.hidden_size, generator=torch.Generator()), 1,
                     max_new_tokens=3, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is where it was
    assert generate_batch(a, [a.prompt("hi")], max_new_tokens=4, temperature=1.0, seed=7) == first
    with seeded(5):
        x = torch.rand(2)
    with seeded(5):
        assert torch.equal(torch.rand(2), x)
