"""Training the probe judge: labelled answers → features → L2 logistic heads (ordinal level, refusal, coherence).

Labelled rows carry `level` (0 opposite, 1 neutral, 2 shown; None when unknown), `refusal` and
`incoherent`. Heads are fitted on standardised features; the regularisation is chosen by
leave-one-trait-out cross-validation, the same path a user's unseen trait takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .probe import HEADS, ProbeFeatures, ProbeWeights


@dataclass
class LabelledAnswer:
    """One labelled answer for a trait (None: the label does not apply to this row)."""

    trait: str
    question: str
    answer: str
    level: int | None
    refusal: bool | None
    incoherent: bool | None
    group: str = ""  # e.g. 'written', 'real'


def head_target(row: LabelledAnswer, head: str) -> float | None:
    """The 0/1 target of one head for a row, or None when the row says nothing about it."""
    if head == "ge1":
        return None if row.level is None or row.refusal else float(row.level >= 1)
    if head == "ge2":
        return None if row.level is None or row.refusal else float(row.level >= 2)
    if head == "refusal":
        return None if row.refusal is None else float(row.refusal)
    return None if row.incoherent is None else float(row.incoherent)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 200) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on standardised features (float64, LBFGS)."""
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w @ w) / 2
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach()[0])


def fit_heads(feats: torch.Tensor, rows: Sequence[LabelledAnswer], layers: list[int], l2: float,
              metadata: dict[str, str] | None = None) -> ProbeWeights:
    """Standardise, then fit every head on the rows that carry its label."""
    mean = feats.double().mean(0)
    std = feats.double().std(0).clamp(min=1e-6)
    z = (feats.double() - mean) / std
    heads = {}
    for head in HEADS:
        idx = [i for i, r in enumerate(rows) if head_target(r, head) is not None]
        y = torch.tensor([head_target(rows[i], head) for i in idx], dtype=torch.float64)
        if len(idx) < 4 or y.min() == y.max():
            continue
        heads[head] = fit_logistic(z[idx], y, l2)
    return ProbeWeights(layers, mean, std, heads, dict(metadata or {}))


def collect_features(features: ProbeFeatures, rows: Sequence[LabelledAnswer], traits: dict,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Probe features [N, F] for labelled rows (traits: name -> Trait)."""
    out = []
    for i, r in enumerate(rows):
        out.append(features.features(traits[r.trait], r.question, r.answer))
        if progress:
            progress(i + 1)
    return torch.stack(out)
