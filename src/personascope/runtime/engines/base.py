"""Inference engines: one interface for generation and judge scoring, run by Hugging Face or vLLM.

`HFEngine` (always available) runs the loaded transformers model; `VLLMEngine` (the `vllm` extra)
runs an in-process `vllm.LLM` on the same weights. Activations, non-constant steering and serving
stay on the HF model; see docs/engines.md for what runs where.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm", "auto")
# below this many token-equivalents (engines.jobs.work_tokens) vLLM's start-up (~2 min on 2 CPU cores) does not
# pay: vLLM saved about 4 ms per generated token and 2 ms per judged prompt token there (measured before
# bench/engines.py, on a quieter machine)
AUTO_MIN_TOKENS = 100_000
MIN_PARAMS = 20_000_000  # smaller models (tests' tiny ones) keep their dtype and the HF engine unmeasured


from .types import Engine  # noqa: E402  (re-exported: the interface every engine implements)


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


def resolve_engine(engine: str, adapter, work_tokens: int, timer=None, model_path: str | None = None):
    """`--engine hf|vllm|auto` and the compute dtype for a job on a loaded model (ModelAdapter), by measurement:
    a short calibration (calibrate.py), cached per machine and model. An explicit engine, a dtype forced with
    PERSONASCOPE_DTYPE, or a GPU's dtype is kept; on a CPU the model is cast to the measured HF dtype."""
    import os

    from .calibrate import DTYPES, Choice, calibrate, decide, dtype_name, model_timer

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "vllm" and not vllm_available():
        raise ValueError("--engine vllm needs vLLM; install it with: pip install 'personascope[vllm]'")
    dev = adapter.device.type
    current = dtype_name(next(adapter.model.parameters()).dtype)
    forced = os.environ.get("PERSONASCOPE_DTYPE")
    fixed = dtype_name(forced) if forced else (None if dev == "cpu" else current)
    if fixed and (engine == "hf" or not vllm_available()):
        return Choice("hf", fixed, "given" if engine == "hf" else "the only engine here")
    if timer is None and engine != "vllm" and sum(p.numel() for p in adapter.model.parameters()) < MIN_PARAMS:
        return Choice("hf", current, "a model this small is not worth measuring")
    name = str(adapter.model.config.name_or_path)
    timings = calibrate(name, dev, timer or model_timer(adapter, model_path), vllm=vllm_available())
    choice = decide(timings, work_tokens, engine, fixed, prefer=("hf", current))
    if choice.engine == "hf" and choice.dtype != current:
        log.info("casting %s from %s to the measured faster %s", name, current, choice.dtype)
        adapter.model.to(DTYPES[choice.dtype])
    return choice


def make_engine(engine: str, adapter, work_tokens: int = 0, model_path: str | None = None, **vllm_kw) -> Engine:
    """The engine for a loaded model: `adapter` (a ModelAdapter) always backs HF; vLLM loads `model_path`
    (a directory or hub name; default: where the built-in or named model lives) and falls back to HF."""
    from .hf import HFEngine

    hf = HFEngine(adapter)
    if choose_engine(engine, work_tokens) == "hf":
        return hf
    from personascope.model import resolve_model_path

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


__all__ = ["AUTO_MIN_TOKENS", "ENGINES", "choose_engine", "make_engine", "make_judge_engine", "resolve_engine",
           "vllm_available"]
