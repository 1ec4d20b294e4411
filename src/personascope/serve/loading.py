"""Models the server can load: built-in names, local paths, and hidden `tiny-random-*` test models."""

from __future__ import annotations

import torch

from personascope.model import ModelAdapter
from personascope.util import seeded

TINY_PREFIX = "tiny-random-"  # hidden test models: random weights built from a config, no files



def tiny_random_model(name: str, seed: int = 0):
    """(model, tokenizer) of `tiny-random-<family>`: random weights, a byte-level tokenizer, ChatML.

    For tests and load tests only: it talks gibberish, fast. Built in code, nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    family = name.removeprefix(TINY_PREFIX)
    if family not in ("qwen2", "llama"):
        raise ValueError(f"unknown tiny test model {name!r}: use tiny-random-qwen2 or tiny-random-llama")
    # printable ASCII, tab and newline only (one token each), so its random answers are readable
    byte_char = _byte_chars()
    specials = ["<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]
    vocab = {byte_char[b]: i for i, b in enumerate([9, 10, *range(32, 127)])}
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=specials)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = AutoConfig.for_model(family, vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, initializer_range=0.2, bos_token_id=vocab["<|im_start|>"],
                               eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"])
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.config.name_or_path = name
    return model, tok


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level map: printable Latin-1 bytes stand for themselves, the others for 256 + k."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    for k, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + k)
    return out


def load_serving_model(name: str, device: str | None = None, dtype: str | None = None) -> ModelAdapter:
    """The adapter of a built-in model, a local path, or a hidden `tiny-random-*` test model."""
    if name.startswith(TINY_PREFIX):
        model, tok = tiny_random_model(name)
        if device:
            model.to(device)
    else:
        from personascope.model import load_model

        model, tok = load_model(name, device=device, dtype=dtype)
    return ModelAdapter(model, tok)

