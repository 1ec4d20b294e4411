import pytest
import torch
from tiny import FAMILIES, tiny_pair

from personascope.model.adapter import ModelAdapter, UnsupportedModelError, block_output, find_blocks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_discovery_and_layer_convention(family):
    model, tok = tiny_pair(family)
    a = ModelAdapter(model, tok)
    assert a.n_layers == 3
    assert a.hidden_size == 32
    ids = torch.tensor([a.encode_prompt(a.prompt("hello there", system="Be brief."))])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == a.n_layers + 1
    outs, ins = {}, {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k, block_output(o)))
             for k, b in enumerate(a.blocks)]
    hooks.append(a.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: ins.__setitem__(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    # index 0 is the embedding output (input of block 0)
    assert torch.allclose(hs[0], ins[0])
    # hidden_states[l] is the output of block l-1; HF applies the final norm to the last entry,
    # so the last index is checked against the normed block output
    for layer in range(1, a.n_layers):
        assert torch.allclose(hs[layer], outs[layer - 1], atol=1e-6), layer
    final_norm = model.base_model.norm if hasattr(model.base_model, "norm") else (
        getattr(model.base_model, "ln_f", None) or model.base_model.final_layer_norm)
    assert torch.allclose(hs[a.n_layers], final_norm(outs[a.n_layers - 1]), atol=1e-5)


def test_system_prompt_merged_when_template_has_no_system_role():
    model, tok = tiny_pair("gemma2")
    a = ModelAdapter(model, tok)
    assert not a.supports_system
    text = a.prompt("What is up?", system="You are terse.")
    assert "You are terse.\n\nWhat is up?" in text
    assert "system" not in text


def test_fallback_template_when_tokenizer_has_none():
    model, tok = tiny_pair("gpt2")
    tok.chat_template = None
    a = ModelAdapter(model, tok)
    text = a.prompt("hi", system="S")
    assert text.endswith("Assistant:") and "System: S" in text


def test_unknown_architecture_names_the_override():
    model, tok = tiny_pair("qwen2")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="blocks_path"):
        find_blocks(model)
    assert len(find_blocks(model, "model.layers")) == 3
    assert ModelAdapter(model, tok, blocks_path="model.layers").n_layers == 3
    with pytest.raises(UnsupportedModelError, match="no attribute path"):
        find_blocks(model, "model.blocks")


def test_layer_range_is_checked(qwen_tiny):
    assert qwen_tiny.check_layer(3) == 3
    with pytest.raises(ValueError, match="valid layers are 0..3"):
        qwen_tiny.check_layer(4)
