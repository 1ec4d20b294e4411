"""Seeded sampling that leaves the caller's random state alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block under `seed` (HF `generate` samples from the global RNG) and restore the caller's RNG after.

    With `seed=None` the block runs on the caller's RNG unchanged.
    """
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
