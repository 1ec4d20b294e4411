"""Job sizing for `--engine auto`; the seed of one engine job (the generation loop is generate.run_generation)."""

from __future__ import annotations

from personascope.model import job_seed


def work_tokens(n_prompts: int, prompt_tokens: int, new_tokens: int = 0) -> int:
    """A job's size for `--engine auto`: a generated token costs about four prompt tokens."""
    return n_prompts * (prompt_tokens + 4 * new_tokens)


__all__ = ["job_seed", "work_tokens"]
