"""Shared helpers for the benchmarks: model choice, timing, and appending to RESULTS.md."""

from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def load(model: str, device: str | None):
    """The built-in model by name, or 'random-7b': random weights of Qwen2.5-7B-Instruct's shape."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from personascope.model import ModelAdapter, load_model, pick_device, pick_dtype

    if model == "random-7b":
        dev = pick_device(device)
        cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096)
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(cfg, dtype=pick_dtype(dev))
        m.eval().config.name_or_path = "random-7b"

        class Tok:  # the benchmark feeds token ids only
            pad_token_id = 0
            eos_token_id = 1

        return ModelAdapter(m, Tok())
    m, tok = load_model(model, device=device)
    return ModelAdapter(m, tok)


def timed(fn, repeat: int = 2) -> float:
    """Best wall time of `repeat` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)"


def record(title: str, lines: list[str]) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as f:
        f.write(f"\n## {title} — {stamp} — {machine()}\n\n" + "\n".join(lines) + "\n")
