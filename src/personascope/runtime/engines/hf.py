"""The Hugging Face engine: the loaded transformers model, in length-bucketed batches sized from memory.

Prompts are sorted by token length so a batch pads little; judge prompts that share a prefix (the
rubric of one trait) run that prefix once and reuse its KV cache for the whole batch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch

from personascope.model import (
    ModelAdapter,
    cache_kwarg,
    common_prefix,
    output_cache,
    pad_batch,
    pad_id,
    position_ids_for,
)
from personascope.steering import SteeringSpec

MIN_SHARED_PREFIX = 16  # tokens; shorter common prefixes are not worth a separate forward
MEMORY_FRACTION = 0.15  # of the device's memory, for one batch's KV cache, activations and logits


def device_memory(device: torch.device) -> int:
    """Total memory of the device in bytes (fixed per machine, so batch sizes repeat between runs)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_batch_size(adapter: ModelAdapter, tokens_per_row: int, cap: int | None = None) -> int:
    """Rows per batch whose KV cache, attention scores and logits fit MEMORY_FRACTION of the device."""
    cfg = adapter.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = adapter.n_layers
    heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or adapter.hidden_size // heads)
    vocab = int(getattr(cfg, "vocab_size", 32_000))
    width = next(adapter.model.parameters()).element_size()
    per_row = (tokens_per_row * (2 * layers * kv * head_dim * width + 8 * adapter.hidden_size * width)
               + heads * tokens_per_row * tokens_per_row * 4 + 3 * vocab * 4)
    budget = MEMORY_FRACTION * device_memory(adapter.device)
    if cap is None:
        cap = 256 if adapter.device.type == "cuda" else 64
    return max(1, min(cap, int(budget // max(per_row, 1))))


class HFEngine:
    """The transformers model as an Engine; it never changes the model or the caller's RNG."""

    name = "hf"
    seeds_per_prompt = False  # a batch samples with one seed

    def __init__(self, adapter: ModelAdapter, batch_size: int | None = None, max_batch: int | None = None):
        self.adapter = adapter
        self.batch_size = batch_size  # None: chosen from memory for each workload
        self.max_batch = max_batch
        self._prefix: tuple[tuple, object] | None = None

    # -- helpers
    def _ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list | tuple) else self.adapter.encode_prompt(prompt)

    def rows_per_batch(self, tokens_per_row: int) -> int:
        """The batch size for rows of about `tokens_per_row` tokens (the fixed one if given)."""
        return self.batch_size or memory_batch_size(self.adapter, tokens_per_row, self.max_batch)

    def chunk_size(self, sampling) -> int:
        return self.rows_per_batch(256 + sampling.max_new_tokens)

    def _batches(self, ids: list[list[int]], extra_tokens: int, group_prefix: int = 0) -> list[list[int]]:
        """Index batches over `ids`, sorted by (leading tokens, length) so each batch pads little."""
        order = sorted(range(len(ids)), key=lambda i: (ids[i][:group_prefix], len(ids[i])))
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            width = max([len(ids[j]) for j in cur] + [len(ids[i])]) + extra_tokens
            if cur and (len(cur) >= self.rows_per_batch(width)
                        or (group_prefix and ids[i][:group_prefix] != ids[cur[0]][:group_prefix])):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    # -- generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sampling, seeds: Sequence[int] | None = None,
                 steering: Sequence[SteeringSpec] = ()) -> list[str]:
        """Answers in length-bucketed left-padded batches; a batch samples with its first prompt's seed."""
        from personascope.steering import Steerer

        ad = self.adapter
        ids = [self._ids(p) for p in prompts]
        out: list[str] = [""] * len(ids)
        steerer = Steerer(ad)
        for s in steering:
            steerer.add(s.vector, s.layer, s.coef, s.positions, s.mode)
        greedy = sampling.temperature <= 0
        dev = ad.device
        with steerer:
            for idx in self._batches(ids, sampling.max_new_tokens):
                batch_ids, mask = pad_batch([ids[i] for i in idx], pad_id(ad.tokenizer), "left")
                devices = [dev.index or 0] if dev.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    if seeds is not None:
                        torch.manual_seed(int(seeds[idx[0]]))
                    gen = ad.model.generate(
                        input_ids=batch_ids.to(dev), attention_mask=mask.to(dev),
                        max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                        temperature=None if greedy else sampling.temperature,
                        top_p=None if greedy else sampling.top_p, top_k=None, pad_token_id=pad_id(ad.tokenizer))
                for row, i in enumerate(idx):
                    new = gen[row, batch_ids.shape[1]:]
                    out[i] = ad.tokenizer.decode(new, skip_special_tokens=True).strip()
        return out

    # -- judge primitives
    def _prefix_cache(self, prefix: tuple[int, ...]):
        """The KV cache of a shared prefix (a trait's rubric), computed once and kept until another prefix
        comes; keyed also by the hooks on the blocks, so a cache made without steering is not reused with it."""
        hooks = tuple(id(h) for b in self.adapter.blocks for h in (*b._forward_hooks.values(),
                                                                    *b._forward_pre_hooks.values()))
        if self._prefix is None or self._prefix[0] != (prefix, hooks):
            model = self.adapter.model
            out = model(input_ids=torch.tensor([prefix], device=self.adapter.device), use_cache=True,
                        logits_to_keep=1)
            self._prefix = ((prefix, hooks), output_cache(out))
        return copy.deepcopy(self._prefix[1])

    @torch.no_grad()
    def last_token_logprobs(self, prompts: Sequence[str | list[int]], top_k: int = 20) -> list[dict[int, float]]:
        """Top-k next-token log-probabilities; a prefix shared by a whole batch runs once."""
        ad = self.adapter
        dev = ad.device
        ids = [self._ids(p) for p in prompts]
        res: list[dict[int, float]] = [{} for _ in ids]
        for idx in self._batches(ids, 0, group_prefix=64):
            rows = [ids[i] for i in idx]
            shared = min(common_prefix(rows), min(len(r) for r in rows) - 1)
            if shared >= MIN_SHARED_PREFIX:
                cache = self._prefix_cache(tuple(rows[0][:shared]))
                cache.batch_repeat_interleave(len(rows))
                suf, smask = pad_batch([r[shared:] for r in rows], pad_id(ad.tokenizer), "left")
                mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), smask], dim=1)
                pos = position_ids_for(mask)[:, shared:]
                logits = ad.model(input_ids=suf.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                  use_cache=True, logits_to_keep=1, **{cache_kwarg(ad.model): cache}).logits
            else:
                batch, mask = pad_batch(rows, pad_id(ad.tokenizer), "left")
                logits = ad.model(input_ids=batch.to(dev), attention_mask=mask.to(dev),
                                  position_ids=position_ids_for(mask).to(dev), logits_to_keep=1).logits
            logp = logits[:, -1].float().log_softmax(-1)
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            for row, i in enumerate(idx):
                res[i] = {int(t): float(v) for t, v in zip(top.indices[row], top.values[row], strict=True)}
        return res

    @torch.no_grad()
    def prompt_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """Per-token answer log-probabilities, left-padded so only the answer positions reach the LM head."""
        ad = self.adapter
        dev = ad.device
        pairs = [ad.encode_pair(p, a) for p, a in zip(prompts, answers, strict=True)]
        full = [p + a for p, a in pairs]
        res: list[list[float]] = [[] for _ in pairs]
        for idx in self._batches(full, 0):
            keep = max(len(pairs[i][1]) for i in idx) + 1
            batch, mask = pad_batch([full[i] for i in idx], pad_id(ad.tokenizer), "left")
            logits = ad.model(input_ids=batch.to(dev), attention_mask=mask.to(dev),
                              position_ids=position_ids_for(mask).to(dev), logits_to_keep=keep).logits
            logp = logits.float().log_softmax(-1)
            for row, i in enumerate(idx):
                a = pairs[i][1]
                if not a:
                    continue
                pos = torch.arange(keep - 1 - len(a), keep - 1, device=logp.device)
                res[i] = logp[row, pos, torch.tensor(a, device=logp.device)].tolist()
        return res
