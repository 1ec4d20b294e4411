"""Inference engines: one interface for generation and judge scoring, run by Hugging Face or vLLM.

`HFEngine` (always available) runs the loaded transformers model; `VLLMEngine` (the `vllm` extra)
runs an in-process `vllm.LLM` on the same weights. Activations, non-constant steering and serving
stay on the HF model; see docs/engines.md for what runs where.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

ENGINES = ("hf", "vllm", "auto")
# below this many token-equivalents (engines.jobs.work_tokens) vLLM's start-up (~2 min on 2 CPU cores) does not
# pay: vLLM saved about 4 ms per generated token and 2 ms per judged prompt token there (measured before
# bench/engines.py, on a quieter machine)
AUTO_MIN_TOKENS = 100_000


@dataclass(frozen=True)
class Steering:
    """One steering term for an engine: add `coef · vector` to the residual stream after block `layer` − 1."""

    vector: torch.Tensor
    layer: int
    coef: float = 1.0
    positions: str = "all"
    mode: str = "add"


@runtime_checkable
class Engine(Protocol):
    """What generation and the local judge need from an inference backend."""

    name: str

    def generate(self, prompts: Sequence[str], sampling, seeds: Sequence[int] | None = None,
                 steering: Sequence[Steering] = ()) -> list[str]:
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


def vllm_available() -> bool:
    """Whether vLLM can be imported here (the `vllm` extra is installed)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def choose_engine(engine: str, work_tokens: int) -> str:
    """Resolve `--engine hf|vllm|auto` to 'hf' or 'vllm' for a job of about `work_tokens` tokens."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "vllm" and not vllm_available():
        raise ValueError("--engine vllm needs vLLM; install it with: pip install 'personascope[vllm]'")
    if engine == "auto":
        return "vllm" if vllm_available() and work_tokens >= AUTO_MIN_TOKENS else "hf"
    return engine


def make_engine(engine: str, adapter, work_tokens: int = 0, model_path: str | None = None, **vllm_kw) -> Engine:
    """The engine for a loaded model: `adapter` (a ModelAdapter) always backs HF; vLLM loads `model_path`
    (a directory or hub name; default: where the built-in or named model lives) and falls back to HF."""
    from .hf import HFEngine

    hf = HFEngine(adapter)
    if choose_engine(engine, work_tokens) == "hf":
        return hf
    from ..models import resolve_model_path
    from .vllm_engine import VLLMEngine

    path = model_path or resolve_model_path(str(adapter.model.config.name_or_path))
    if not (Path(path) / "config.json").exists() or (Path(path) / "adapter_config.json").exists():
        warnings.warn(f"vLLM cannot load {path!r} (not a plain model directory); using the HF engine", stacklevel=2)
        return hf
    vllm_kw.setdefault("dtype", next(adapter.model.parameters()).dtype)
    return VLLMEngine(path, tokenizer=adapter.tokenizer, fallback=hf, **vllm_kw)


def make_judge_engine(engine: str, judge, n_judgements: int, prompt_tokens: int = 300) -> str | None:
    """Give a local judge (LocalJudge) the chosen engine for its scoring; returns the engine's name, or None
    for a judge that runs elsewhere (an API judge)."""
    adapter = getattr(judge, "adapter", None)
    if adapter is None or not hasattr(judge, "engine"):
        return None
    judge.engine = make_engine(engine, adapter, n_judgements * prompt_tokens)
    return judge.engine.name


__all__ = ["AUTO_MIN_TOKENS", "ENGINES", "Engine", "Steering", "choose_engine", "make_engine", "make_judge_engine",
           "vllm_available"]
