"""Inference engines: one interface for generation and judge scoring, run by Hugging Face or vLLM."""

from .base import ENGINES, choose_engine, make_engine, make_judge_engine, vllm_available
from .hf import HFEngine
from .types import Engine
from .vllm_engine import VLLMEngine
from .work import work_tokens

__all__ = [
    "ENGINES", "Engine", "HFEngine", "VLLMEngine", "choose_engine", "make_engine", "make_judge_engine",
    "vllm_available", "work_tokens",
]
