"""The few statistics personascope reports: AUROC, rank and linear correlation, bootstrap intervals."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence

import torch


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count half); nan when one class is absent."""
    s = torch.tensor([float(x) for x in scores], dtype=torch.float64)
    y = torch.tensor([bool(v) for v in labels], dtype=torch.bool)
    if len(s) != len(y):
        raise ValueError(f"auroc: {len(s)} scores but {len(y)} labels")
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    p, n = pos[:, None], neg[None, :]
    wins = (p > n).sum().item() + 0.5 * (p == n).sum().item()
    return wins / (len(pos) * len(neg))


def _ranks(v: Sequence[float]) -> torch.Tensor:
    t = torch.tensor([float(x) for x in v], dtype=torch.float64)
    order = t.argsort()
    r = torch.empty_like(t)
    r[order] = torch.arange(len(t), dtype=torch.float64)
    for val in t.unique():
        m = t == val
        r[m] = r[m].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with < 3 points or no variance."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den else float("nan")


def pearson_r(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Pearson correlation over the pairs where both values exist; None with < 3 pairs or no variance."""
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    mx = statistics.fmean(p[0] for p in pairs)
    my = statistics.fmean(p[1] for p in pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def format_ci(ci: Sequence[float] | None, digits: int = 2) -> str:
    """' [lo, hi]' for an interval (as bootstrap_ci returns it), '' when there is none."""
    return "" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def bootstrap_ci(rows: Sequence, stat: Callable[[list], float | None], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `stat` over resampled `rows` (own RNG; None if too few finite values)."""
    rng = random.Random(seed)
    vals = []
    for _ in range(n):
        v = stat([rows[rng.randrange(len(rows))] for _ in rows]) if rows else None
        if v is not None and math.isfinite(v):
            vals.append(v)
    if len(vals) < n // 2:
        return None
    vals.sort()
    lo = vals[int((1 - level) / 2 * len(vals))]
    hi = vals[min(len(vals) - 1, int((1 + level) / 2 * len(vals)))]
    return lo, hi
