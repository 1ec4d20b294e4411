"""Judge forwards that skip repeated work: a prompt prefix shared by a batch (a trait's rubric up to the question,
a contrast side's system prompt) runs once and its KV cache serves every row; logits only where they are read.

Rows are grouped by their leading tokens and sorted by length, so a batch pads little; results come back in
input order. Scores equal the plain full-prompt forward up to the dtype's rounding.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
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

MIN_SHARED = 16  # tokens; a shorter common prefix is not worth a separate forward
GROUP = 64  # leading tokens that group rows into batches
KEEP = 4  # prefix caches kept (trait rubric, coherence rubric, contrast sides)


class PrefixForward:
    """Batched judge forwards over token ids with shared-prefix KV reuse (see module doc)."""

    def __init__(self, adapter: ModelAdapter, batch_size: int = 4):
        self.adapter = adapter
        self.batch_size = batch_size
        self._caches: OrderedDict[tuple, object] = OrderedDict()

    def _batches(self, ids: Sequence[Sequence[int]], limits: Sequence[int]) -> list[tuple[list[int], int]]:
        """(row indices, shared prefix length) per batch: rows grouped by leading tokens and sorted by length;
        the prefix is what the whole group shares (at most each row's `limits` − 1 tokens; none for a lone row)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in sorted(range(len(ids)), key=lambda i: len(ids[i])):
            groups.setdefault(tuple(ids[i][:GROUP]), []).append(i)
        out = []
        for idx in groups.values():
            shared = 0
            if len(idx) > 1:
                shared = min(common_prefix([ids[i] for i in idx]), min(limits[i] for i in idx) - 1)
            out += [(idx[s : s + self.batch_size], shared) for s in range(0, len(idx), self.batch_size)]
        return out

    def _prefix_cache(self, prefix: tuple[int, ...], rows: int):
        """A copy of the prefix's KV cache repeated for `rows` rows (kept per prefix and hooks on the blocks, so
        a cache made without steering is never reused with it)."""
        hooks = tuple(id(h) for b in self.adapter.blocks for h in (*b._forward_hooks.values(),
                                                                    *b._forward_pre_hooks.values()))
        key = (prefix, hooks)
        if key not in self._caches:
            out = self.adapter.model(input_ids=torch.tensor([prefix], device=self.adapter.device), use_cache=True,
                                     logits_to_keep=1)
            self._caches[key] = output_cache(out)
            while len(self._caches) > KEEP:
                self._caches.popitem(last=False)
        self._caches.move_to_end(key)
        cache = copy.deepcopy(self._caches[key])
        cache.batch_repeat_interleave(rows)  # type: ignore[attr-defined]
        return cache

    def _logits(self, rows: list[list[int]], shared: int, keep: int) -> torch.Tensor:
        """The last `keep` positions' logits of left-padded rows, the first `shared` tokens from a cached prefix."""
        ad = self.adapter
        dev = ad.device
        if shared < MIN_SHARED:
            batch, mask = pad_batch(rows, pad_id(ad.tokenizer), "left")
            return ad.model(input_ids=batch.to(dev), attention_mask=mask.to(dev),
                            position_ids=position_ids_for(mask).to(dev), logits_to_keep=keep).logits
        cache = self._prefix_cache(tuple(rows[0][:shared]), len(rows))
        suf, smask = pad_batch([r[shared:] for r in rows], pad_id(ad.tokenizer), "left")
        mask = torch.cat([torch.ones(len(rows), shared, dtype=smask.dtype), smask], dim=1)
        pos = position_ids_for(mask)[:, shared:]
        return ad.model(input_ids=suf.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                        logits_to_keep=keep, **{cache_kwarg(ad.model): cache}).logits

    @torch.no_grad()
    def last_token_probs(self, ids: Sequence[list[int]]) -> torch.Tensor:
        """Next-token probabilities over the whole vocabulary after each prompt [N, V] (float32, CPU)."""
        out: list[torch.Tensor | None] = [None] * len(ids)
        for idx, shared in self._batches(ids, [len(r) for r in ids]):
            rows = [ids[i] for i in idx]
            probs = self._logits(rows, shared, 1)[:, -1].float().softmax(-1).cpu()
            for row, i in enumerate(idx):
                out[i] = probs[row]
        return torch.stack([p for p in out if p is not None])

    @torch.no_grad()
    def answer_logprobs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[list[float]]:
        """log p(answer token | prompt, earlier answer tokens) per answer token of (prompt ids, answer ids) pairs."""
        full = [p + a for p, a in pairs]
        res: list[list[float]] = [[] for _ in pairs]
        for idx, shared in self._batches(full, [len(p) for p, _ in pairs]):
            rows = [full[i] for i in idx]
            keep = max(len(pairs[i][1]) for i in idx) + 1
            logits = self._logits(rows, shared, keep)
            for row, i in enumerate(idx):
                a = pairs[i][1]
                if not a:
                    continue
                lp = logits[row, keep - 1 - len(a): keep - 1].float().log_softmax(-1)
                res[i] = lp[torch.arange(len(a)), torch.tensor(a, device=lp.device)].tolist()
        return res
