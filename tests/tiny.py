"""Tiny randomly initialised models and a byte-level tokenizer, built in code (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# a Gemma-like template that rejects the system role
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<start>assistant\n{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<start>", "<end>"]


def tiny_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with one token per byte (digits are single tokens)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=SPECIALS)
    tok.chat_template = template
    return tok


VOCAB = 264  # 256 bytes + 5 specials, rounded up

_IDS = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)
_COMMON = dict(**_IDS, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
FAMILIES: dict[str, dict] = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=8),
    "mistral": dict(_COMMON),
    "gemma2": dict(_COMMON, head_dim=8),
    "gemma3_text": dict(_COMMON, head_dim=8),
    "phi3": dict(_COMMON, num_key_value_heads=4),
    "gpt2": dict(**_IDS, vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gpt_neox": dict(**_IDS, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=256),
}


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    """A tiny random model of one family, in float32 and eval mode."""
    from transformers import AutoConfig

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.name_or_path = f"tiny-{family}"
    return model.eval()


def tiny_pair(family: str = "qwen2", seed: int = 0, **overrides):
    template = NO_SYSTEM if family.startswith("gemma") else CHATML
    return tiny_model(family, seed, **overrides), tiny_tokenizer(template)


def markov_model(tokenizer, table: dict[int, dict[int, float]], filler: int):
    """A tiny Llama whose next-token distribution depends only on the current token, as set by hand.

    `table[ctx] = {next_id: prob}`; the rest of the mass goes to `filler`. Attention and MLP
    outputs are zeroed, so the last hidden state is the current token's embedding, a scaled basis
    vector e_k; the LM head's column k holds that context's log-probabilities.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    d = max(16, len(table))
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (ctx, dist) in enumerate(table.items()):
            model.model.embed_tokens.weight[ctx, k] = d**0.5
            logits = torch.full((len(tokenizer),), -40.0)
            rest = 1.0 - sum(dist.values())
            for tid, p in {**dist, filler: dist.get(filler, 0.0) + max(rest, 0.0)}.items():
                if p > 0:
                    logits[tid] = torch.log(torch.tensor(p))
            model.lm_head.weight[:, k] = logits / d**0.5
    model.config.name_or_path = "markov"
    return model
