"""Residual-stream activations reduced to spans on the fly with forward hooks.

Every layer's output is reduced inside its hook to `prompt_avg`, `response_avg` and `prompt_last`
in float32, so no layers × tokens tensor is ever kept. The base model is called (no LM head), and
position ids come from the attention mask, so left and right padding give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .adapter import ModelAdapter, pad_batch, pad_id
from .hooks import forward_with_residual_hooks

SPANS = ("prompt_avg", "response_avg", "prompt_last")


@dataclass
class SpanBatch:
    """Span activations of one batch: each span is [B, n_layers, d] float32, for `layers`."""

    indices: list[int]
    layers: list[int]
    spans: dict[str, torch.Tensor]
    resid_norm: torch.Tensor  # [B, n_layers]: mean L2 norm over response tokens


def _masks(lengths: list[tuple[int, int]], width: int, side: str):
    """Prompt mask, response mask and last-prompt-token index for a padded batch."""
    b = len(lengths)
    pmask = torch.zeros(b, width)
    rmask = torch.zeros(b, width)
    last = torch.zeros(b, dtype=torch.long)
    for i, (np_, nr) in enumerate(lengths):
        start = width - np_ - nr if side == "left" else 0
        pmask[i, start : start + np_] = 1
        rmask[i, start + np_ : start + np_ + nr] = 1
        last[i] = start + np_ - 1
    return pmask, rmask, last


@torch.no_grad()
def iter_span_batches(
    adapter: ModelAdapter,
    items: Sequence[tuple[list[int], list[int]]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
    sort_by_length: bool = True,
) -> Iterator[SpanBatch]:
    """Yield span activations for (prompt ids, response ids) items, batched with padding masks.

    An empty response gives a zero `response_avg`. Items are batched by length when
    `sort_by_length`; `SpanBatch.indices` maps rows back to `items`.
    """
    layers = list(range(adapter.n_layers + 1)) if layers is None else [adapter.check_layer(x) for x in layers]
    order = list(range(len(items)))
    if sort_by_length:
        order.sort(key=lambda i: len(items[i][0]) + len(items[i][1]))
    dev = adapter.device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [items[i][0] + items[i][1] for i in idx]
        ids, mask = pad_batch(seqs, pad_id(adapter.tokenizer), padding_side)
        pmask, rmask, last = _masks([(len(items[i][0]), len(items[i][1])) for i in idx], ids.shape[1],
                                    padding_side)
        pmask, rmask, last = pmask.to(dev), rmask.to(dev), last.to(dev)
        pcount = pmask.sum(1, keepdim=True).clamp(min=1)
        rcount = rmask.sum(1, keepdim=True).clamp(min=1)
        out = {s: torch.zeros(len(idx), len(layers), adapter.hidden_size) for s in SPANS}
        norms = torch.zeros(len(idx), len(layers))
        rows = torch.arange(len(idx), device=dev)

        def reduce(slot: int, h: torch.Tensor) -> None:
            hf = h.float()
            out["prompt_avg"][:, slot] = (torch.einsum("bt,btd->bd", pmask, hf) / pcount).cpu()
            out["response_avg"][:, slot] = (torch.einsum("bt,btd->bd", rmask, hf) / rcount).cpu()
            out["prompt_last"][:, slot] = hf[rows, last].cpu()
            norms[:, slot] = ((hf.norm(dim=-1) * rmask).sum(1) / rcount[:, 0]).cpu()

        forward_with_residual_hooks(adapter, layers, reduce, ids, mask)
        yield SpanBatch(indices=idx, layers=layers, spans=out, resid_norm=norms)


def collect_spans(
    adapter: ModelAdapter,
    items: Sequence[tuple[list[int], list[int]]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All items' span activations in input order: ({span: [N, n_layers, d]}, resid_norm [N, n_layers])."""
    n_layers = adapter.n_layers + 1 if layers is None else len(layers)
    spans = {s: torch.zeros(len(items), n_layers, adapter.hidden_size) for s in SPANS}
    norms = torch.zeros(len(items), n_layers)
    for batch in iter_span_batches(adapter, items, layers, batch_size, padding_side):
        for s in SPANS:
            spans[s][batch.indices] = batch.spans[s]
        norms[batch.indices] = batch.resid_norm
    return spans, norms


def last_token_activations(adapter: ModelAdapter, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
    """[N, L + 1, d] float32: every layer's residual stream at the last token of each rendered prompt."""
    items: list[tuple[list[int], list[int]]] = [(adapter.encode_prompt(p), []) for p in prompts]
    spans, _ = collect_spans(adapter, items, batch_size=batch_size)
    return spans["prompt_last"]


def project(acts: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Scalar projection on the unit vector: a · v / ||v|| (broadcast over leading dims)."""
    v = vector.float()
    return acts.float() @ (v / v.norm().clamp(min=1e-12))

