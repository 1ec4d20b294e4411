"""Persona-shift telemetry helpers: rules that act on a shift, the probe forward, and the trajectory file and plot.

The trajectory (`persona_shift.jsonl`) holds one row per measurement, `{"step", "epoch", "seconds",
"values": {name: {"layer", "projection", "shift"}}}`, and one row per rule that fired, `{"event": ...}`.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from personascope.model import ModelAdapter, forward_with_residual_hooks, pad_batch, pad_id

TRAJECTORY_FILE = "persona_shift.jsonl"
PLOT_FILE = "persona_shift.png"
ACTIONS = ("stop", "steer")


class ShiftInputError(ValueError):
    """A monitored vector, probe set or rule that cannot work with this model (raised before training)."""


@dataclass(frozen=True)
class ShiftRule:
    """Act once when a monitored vector's shift exceeds `threshold`: `stop` training, or `steer` (+coef·v[l])."""

    action: str
    vector: str
    threshold: float
    coef: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ShiftInputError(f"unknown rule action {self.action!r}; use stop or steer")
        if not math.isfinite(self.threshold) or not math.isfinite(self.coef):
            raise ShiftInputError(f"rule on {self.vector!r}: threshold and coef must be finite numbers")

    @classmethod
    def stop(cls, vector: str, threshold: float) -> ShiftRule:
        """Stop training (keeping the last good weights) once the shift exceeds `threshold`."""
        return cls("stop", vector, float(threshold))

    @classmethod
    def steer(cls, vector: str, threshold: float, coef: float) -> ShiftRule:
        """Switch on preventative steering along the vector, with this coefficient, once the shift exceeds it."""
        return cls("steer", vector, float(threshold), float(coef))


def parse_rule(spec: str, option: str = "--stop-above") -> tuple[str, float]:
    """`NAME=THRESHOLD` → (name, threshold); errors name the option."""
    name, sep, value = spec.rpartition("=")
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not sep or not name or not math.isfinite(threshold):
        raise ShiftInputError(f"{option} {spec!r}: expected NAME=THRESHOLD with a finite number, e.g. optimistic=2.5")
    return name, threshold


class _Stop(Exception):
    """Raised by the probe's last hook: the blocks above the highest monitored layer need not run."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain causal LM under DDP/accelerate wrappers and a PEFT model (LoRA layers stay in place)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.no_grad()
def probe_last_token(adapter: ModelAdapter, prompts: Sequence[list[int]], layers: Sequence[int],
                     batch_size: int = 16) -> torch.Tensor:
    """[N, len(layers), d] float32 residuals at each prompt's last token, stopping after the highest layer."""
    out = torch.zeros(len(prompts), len(layers), adapter.hidden_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    top = max(range(len(layers)), key=lambda s: layers[s])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([list(prompts[i]) for i in idx], pad_id(adapter.tokenizer), "left")

        def read(slot: int, h: torch.Tensor) -> None:
            out[idx, slot] = h[:, -1].float().cpu()
            if slot == top:
                raise _Stop

        with contextlib.suppress(_Stop):
            forward_with_residual_hooks(adapter, layers, read, ids, mask)
    return out


def check_probes(adapter: ModelAdapter, probes: Mapping[str, Sequence[list[int]]]) -> None:
    """Every probe set non-empty and every prompt within the model's context."""
    limit = adapter.context_length
    for name, ids in probes.items():
        if not ids:
            raise ShiftInputError(f"the probe set of {name!r} is empty")
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) > limit:
            raise ShiftInputError(f"probe prompt {longest + 1} of {name!r} is {len(ids[longest])} tokens; "
                                  f"{adapter.name} takes at most {limit}")


def read_trajectory(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(measurements, events) from a `persona_shift.jsonl` file or the run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAJECTORY_FILE if (path / TRAJECTORY_FILE).exists() else path / "checkpoints" / TRAJECTORY_FILE
    if not path.exists():
        raise FileNotFoundError(f"no persona-shift trajectory at {path} (finetune with --watch-vector writes one)")
    rows: list[dict] = []
    events: list[dict] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ShiftInputError(f"{path}:{n}: malformed JSON line") from None
        (events if "event" in row else rows).append(row)
    return rows, events


def plot_trajectory(rows: list[dict], events: list[dict], path: Path, title: str,
                    final: Mapping[str, float] | None = None) -> Path | None:
    """Shift per monitored vector over training steps, rule firings marked, and (optionally) a measured final."""
    if not rows:
        return None
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(rows[0]["values"])
    for i, name in enumerate(names):
        pts = [(r["step"], r["values"][name]["shift"]) for r in rows if name in r["values"]]
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color,
                label=f"{name} (layer {rows[0]['values'][name]['layer']})")
        if final and name in final:
            ax.scatter([pts[-1][0]], [final[name]], marker="*", s=90, color=color, zorder=3,
                       label=f"{name}: final shift measured afterwards")
    for ev in events:
        ax.axvline(ev["step"], color="tab:red" if ev["event"] == "stop" else "tab:green", lw=0.8, ls=":")
        ax.annotate(f"{ev['event']} ({ev['vector']})", (ev["step"], ax.get_ylim()[1]), fontsize=7, rotation=90,
                    va="top", ha="right")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("shift along v̂ (last prompt token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
