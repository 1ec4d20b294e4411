"""The values the screening run and its report share: its configuration, one pass, the result."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .score import BadRow


@dataclass(frozen=True)
class ScreenConfig:
    """How a file is screened."""

    method: str = "generate"
    batch_size: int = 8
    chunk_size: int = 256
    max_new_tokens: int = 128
    padding_side: str = "right"
    n_boot: int = 1000
    seed: int = 0


@dataclass
class PassResult:
    """ΔP (and judge scores) of every screened row of one file, in file order."""

    lines: np.ndarray
    delta: dict[str, np.ndarray]
    judge: dict[str, np.ndarray]  # NaN where missing; empty without a judge
    malformed: list[BadRow]
    n_malformed: int
    n_rows: int
    seconds: float
    screened_now: int
