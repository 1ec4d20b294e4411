"""`--engine auto` and the CPU dtype chosen by measurement: a few timed decode steps per candidate
(HF bf16 / fp32, vLLM when installed), cached per machine and model in `cache_dir()/calibration.json`.

The decision (`decide`) is pure: each candidate's expected time for the job is its start-up plus the job's
generated-token equivalents over its measured decode rate; the fastest wins. An explicit engine or dtype
restricts the candidates and is never overridden.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import torch

from personascope.model import CALIBRATION_FILE, cache_dir, machine_key, model_identity

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CAL_PROMPTS, CAL_PROMPT_TOKENS, CAL_NEW_TOKENS = 4, 32, 8  # one calibration step: 4 rows × 32 prompt tokens, 8 new
MARGIN = 1.2  # another candidate must be this much faster to replace the preferred one (timings are noisy)
MAX_ENTRIES = 64  # machine × model entries kept in the cache file (the most recent)


@dataclass(frozen=True)
class Timing:
    """One candidate's measurement: decode rate in new tokens/s and the seconds it takes to start."""

    engine: str
    dtype: str
    tok_s: float
    startup_s: float = 0.0
    error: str | None = None

    def label(self) -> str:
        if self.error:
            return f"{self.engine} {self.dtype}: failed ({self.error})"
        start = f", start-up {self.startup_s:.0f} s" if self.startup_s else ""
        return f"{self.engine} {self.dtype} {self.tok_s:.1f} tok/s{start}"


@dataclass
class Choice:
    """The engine and dtype for one job, with the timings behind them (empty when both were given)."""

    engine: str
    dtype: str
    reason: str
    timings: list[Timing] = field(default_factory=list)
    estimates_s: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the CLI: the choice, why, and every candidate's measurement."""
        measured = "; ".join(t.label() for t in self.timings)
        return f"engine {self.engine}, dtype {self.dtype} ({self.reason})" + (f" — measured: {measured}" if
                                                                              measured else "")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict:
        return {"engine": self.engine, "dtype": self.dtype, "reason": self.reason,
                "timings": [asdict(t) for t in self.timings], "estimates_s": self.estimates_s}


Timer = Callable[[str, str], Timing]  # (engine, dtype) -> its Timing


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bf16', 'fp16' or 'fp32' for a torch dtype or any of its spellings."""
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype) or \
            DTYPES[dtype]
    return next(k for k, v in DTYPES.items() if v == dtype)


def candidates(device_type: str, vllm: bool, engine: str = "auto", dtype: str | None = None) -> list[tuple[str, str]]:
    """(engine, dtype) pairs worth timing on this device, restricted to an explicit engine or dtype."""
    dtypes = ["bf16", "fp32"] if device_type == "cpu" else ["bf16" if device_type == "cuda" else "fp16"]
    engines = ["hf", "vllm"] if vllm else ["hf"]
    return [(e, d) for e in engines for d in dtypes
            if engine in ("auto", e) and (dtype is None or dtype_name(dtype) == d)]


def decide(timings: Sequence[Timing], work_tokens: int, engine: str = "auto", dtype: str | None = None,
           prefer: tuple[str, str] | None = None) -> Choice:
    """The candidate finishing a job of `work_tokens` token-equivalents (a generated token counts 4, so the job
    decodes about work_tokens / 4 tokens) soonest: start-up + work / (4 · rate). Failed timings never win;
    `prefer` (engine, dtype), e.g. what is loaded, stays unless another is MARGIN times faster."""
    ok = [t for t in timings if not t.error and t.tok_s > 0 and engine in ("auto", t.engine)
          and (dtype is None or t.dtype == dtype_name(dtype))]
    if not ok:
        raise ValueError("no engine/dtype candidate could be measured: " + "; ".join(t.label() for t in timings))
    est = {f"{t.engine} {t.dtype}": t.startup_s + work_tokens / (4.0 * t.tok_s) for t in ok}
    best = min(ok, key=lambda t: (est[f"{t.engine} {t.dtype}"], t.engine != "hf"))
    kept = f"{prefer[0]} {prefer[1]}" if prefer else ""
    if kept in est and est[kept] <= MARGIN * est[f"{best.engine} {best.dtype}"]:
        return Choice(prefer[0], prefer[1], f"as loaded: within {MARGIN:g}x of the fastest measured",  # type: ignore[index]
                      list(timings), est)
    return Choice(best.engine, best.dtype, f"fastest measured for ~{work_tokens:,} token-equivalents",
                  list(timings), est)


# ---------------------------------------------------------------- the cache


def cache_key(model: str) -> str:
    return f"{machine_key()}|{model_identity(model)}"


def cached_timings(model: str) -> list[Timing] | None:
    """This machine's stored timings for `model`, or None."""
    try:
        entry = json.loads((cache_dir() / CALIBRATION_FILE).read_text()).get(cache_key(model))
    except (OSError, ValueError):
        return None
    return [Timing(**t) for t in entry["timings"]] if entry else None


def store_timings(model: str, timings: Sequence[Timing]) -> None:
    """Record the timings and the fastest HF dtype (what load_model then picks on this CPU)."""
    path = cache_dir() / CALIBRATION_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    hf = [t for t in timings if t.engine == "hf" and not t.error and t.tok_s > 0]
    table[cache_key(model)] = {"timings": [asdict(t) for t in timings],
                               "hf_dtype": max(hf, key=lambda t: t.tok_s).dtype if hf else None,
                               "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    table = dict(sorted(table.items(), key=lambda kv: kv[1].get("measured_at", ""))[-MAX_ENTRIES:])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def time_hf(model: torch.nn.Module, dtype: str, steps: int = CAL_NEW_TOKENS, rows: int = CAL_PROMPTS,
            prompt_tokens: int = CAL_PROMPT_TOKENS) -> Timing:
    """Greedy decode rate of the loaded model cast to `dtype` (on a copy when the cast would lose precision),
    after one warm-up step; the model is left as it was."""
    target = DTYPES[dtype]
    current = next(model.parameters()).dtype
    lossless = torch.finfo(current).bits <= torch.finfo(target).bits and not (
        current == torch.float16 and target == torch.bfloat16)
    subject = model if lossless or current == target else copy.deepcopy(model)
    dev = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, max(11, min(vocab, 30_000)), (rows, prompt_tokens), generator=gen)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=steps)
    try:
        subject.to(target)
        with torch.random.fork_rng(devices=[]):
            subject.generate(input_ids=ids.to(dev), max_new_tokens=1, **{**kw, "min_new_tokens": 1})
            t0 = time.perf_counter()
            subject.generate(input_ids=ids.to(dev), max_new_tokens=steps, **kw)
            elapsed = time.perf_counter() - t0
        return Timing("hf", dtype, rows * steps / max(elapsed, 1e-9))
    except (RuntimeError, TypeError) as e:  # a dtype the device cannot run
        return Timing("hf", dtype, 0.0, error=str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
    finally:
        if subject is model:
            model.to(current)


def time_vllm(model_path: str, dtype: str, steps: int = CAL_NEW_TOKENS, rows: int = CAL_PROMPTS) -> Timing:
    """vLLM's start-up and decode rate (compiled graph, as unsteered generation runs it)."""
    try:
        from .vllm_engine import VLLMEngine

        t0 = time.perf_counter()
        eng = VLLMEngine(model_path, dtype=DTYPES[dtype], steerable=False)
        startup = time.perf_counter() - t0
        from personascope.model import SamplingConfig

        prompts = [list(range(10 + r, 42 + r)) for r in range(rows)]
        eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=1))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=steps))  # type: ignore[arg-type]
        return Timing("vllm", dtype, rows * steps / max(time.perf_counter() - t0, 1e-9), startup)
    except Exception as e:  # noqa: BLE001  (any failure of an optional engine only removes the candidate)
        return Timing("vllm", dtype, 0.0, error=f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")


def model_timer(adapter, model_path: str | None = None) -> Timer:
    """The timing function for a loaded model (ModelAdapter): HF on the model itself, vLLM on `model_path`."""
    def timer(engine: str, dtype: str) -> Timing:
        if engine == "hf":
            return time_hf(adapter.model, dtype)
        from personascope.model import resolve_model_path

        return time_vllm(model_path or resolve_model_path(adapter.name), dtype)  # a built-in name → its directory
    return timer


def calibrate(model: str, device_type: str, timer: Timer, vllm: bool = False, refresh: bool = False
              ) -> list[Timing]:
    """Timings of every candidate for `model` on this machine: the cached ones, else measured now and stored."""
    have = None if refresh else cached_timings(model)
    want = candidates(device_type, vllm)
    if have is not None and {(t.engine, t.dtype) for t in have} >= set(want):
        return have
    timings = []
    for engine, dtype in want:
        t0 = time.perf_counter()
        timings.append(timer(engine, dtype))
        log.info("calibration: %s (%.1f s)", timings[-1].label(), time.perf_counter() - t0)
    with contextlib.suppress(OSError):
        store_timings(model, timings)
    return timings


__all__ = ["Choice", "Timing", "calibrate", "cached_timings", "candidates", "decide", "dtype_name", "model_timer",
           "store_timings", "time_hf", "time_vllm"]
