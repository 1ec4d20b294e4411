"""The interface every inference engine implements; steering terms are the one `steering.SteeringSpec`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from personascope.steering import SteeringSpec


@runtime_checkable
class Engine(Protocol):
    """What generation and the local judge need from an inference backend."""

    name: str

    def generate(self, prompts: Sequence[str], sampling, seeds: Sequence[int] | None = None,
                 steering: Sequence[SteeringSpec] = ()) -> list[str]:
        """One answer per rendered prompt (greedy at temperature 0); `sampling` is a SamplingConfig."""
        ...

    def last_token_logprobs(self, prompts: Sequence[str | list[int]], top_k: int = 20) -> list[dict[int, float]]:
        """The top-k next-token log-probabilities after each prompt (text or token ids)."""
        ...

    def prompt_logprobs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[float]]:
        """log p(answer token | prompt, earlier answer tokens) for each answer token, tokenised apart."""
        ...

    def chunk_size(self, sampling) -> int:
        """How many prompts a caller should hand over per `generate` call (fixed, so resumed runs match)."""
        ...
