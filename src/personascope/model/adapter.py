"""Model adapter: where the decoder blocks are, how many, how wide, and how to render chats.

Layer convention: index 0 is the embedding output (the input of block 0), index
l >= 1 is the output of block l - 1, so a vector file holds L + 1 rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import nn

from .chat import merge_system

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# model_type -> dotted path of the decoder block list
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class UnsupportedModelError(ValueError):
    """The adapter cannot find the decoder blocks of a model."""


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(f"{type(root).__name__} has no attribute path {path!r} (stopped at {part!r})")
        obj = getattr(obj, part)
    return obj


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> nn.ModuleList:
    """The decoder blocks of a known architecture, or of the module path given as override."""
    model_type = getattr(model.config, "model_type", None)
    path = blocks_path or BLOCK_PATHS.get(model_type or "")
    if path is None:
        raise UnsupportedModelError(
            f"Unknown architecture {model_type!r} ({type(model).__name__}); pass the path of its decoder "
            "block list as an override, e.g. blocks_path='model.layers' (CLI: --blocks-path model.layers)."
        )
    blocks = _get_path(model, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(f"{path!r} of {type(model).__name__} is not a non-empty list of blocks")
    return blocks


def block_output(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (blocks return a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output, hidden: torch.Tensor):
    """A block output with its hidden-state tensor replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class ModelAdapter:
    """A loaded causal LM plus what personascope needs to know about it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    blocks_path: str | None = None

    @cached_property
    def blocks(self) -> nn.ModuleList:
        return find_blocks(self.model, self.blocks_path)

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks (a vector has L + 1 rows)."""
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return str(getattr(self.model.config, "name_or_path", "") or type(self.model).__name__)

    @property
    def context_length(self) -> int:
        """The most positions the model takes (max_position_embeddings / n_positions; 32768 when unknown)."""
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 32768)

    @property
    def architecture(self) -> str:
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return archs[0]

    @cached_property
    def config_hash(self) -> str:
        """A short hash of the architecture-defining config fields (not the name or dtype)."""
        cfg = self.model.config.to_dict()
        keep = {k: v for k, v in cfg.items() if k not in {"_name_or_path", "name_or_path", "torch_dtype", "dtype",
                                                          "transformers_version", "architectures",
                                                          "quantization_config", "use_cache"}}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is out of range for {self.name}: valid layers are 0..{self.n_layers}")
        return layer

    @cached_property
    def supports_system(self) -> bool:
        """Whether the chat template accepts a system turn (Gemma's does not)."""
        try:
            text = self._apply([{"role": "system", "content": "SYS-PROBE"}, {"role": "user", "content": "hi"}],
                               add_generation_prompt=True)
        except Exception:
            return False
        return "SYS-PROBE" in text

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        template = getattr(tok, "chat_template", None) or FALLBACK_TEMPLATE
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       chat_template=template)

    def messages(self, user: str, system: str | None = None, shots: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """Chat messages of a question with an optional system prompt and (question, answer) examples."""
        msgs: list[dict] = [] if system is None else [{"role": "system", "content": system}]
        for q, a in shots:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return [*msgs, {"role": "user", "content": user}]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template text of validated chat messages; the system message is merged into the first user
        turn where the template has no system role. The one public rendering path."""
        return self._apply(merge_system(messages, self.supports_system), add_generation_prompt)

    def prompt(self, user: str, system: str | None = None, shots: Sequence[tuple[str, str]] = ()) -> str:
        """The rendered chat prompt up to the start of the assistant's answer."""
        return self.render(self.messages(user, system, shots))

    def encode_prompt(self, prompt_text: str) -> list[int]:
        return self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, prompt_text: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of a rendered prompt and of an answer, tokenised apart so the boundary is exact."""
        return self.encode_prompt(prompt_text), self.tokenizer(answer, add_special_tokens=False)["input_ids"]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding, so left and right padding give the same activations."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares."""
    n = min(len(r) for r in rows)
    first = rows[0]
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one tensor; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """The name of a model's KV-cache argument: `cache` from transformers 5.20, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a model output, under either transformers name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)
