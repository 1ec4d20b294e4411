"""Inference engines: one interface for generation and judge scoring, run by Hugging Face or vLLM."""

from .base import ENGINES, choose_engine, make_engine, make_judge_engine, resolve_engine, vllm_available
from .calibrate import Choice, Timing, calibrate, decide
from .hf import HFEngine
from .types import Engine
from .vllm_engine import VLLMEngine, memory_kw
from .work import work_tokens

__all__ = [
    "ENGINES", "Choice", "Engine", "HFEngine", "Timing", "VLLMEngine", "calibrate", "choose_engine", "decide",
    "make_engine", "make_judge_engine", "memory_kw", "resolve_engine", "vllm_available", "work_tokens",
]
