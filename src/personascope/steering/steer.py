"""Steering: add `coef · v[l]` to the residual stream at layer l (or ablate v̂) while the model runs.

Positions: `all` (every position of every forward), `prompt` (the prefill forward only) and
`response` (the last position of every forward: the last prompt token at prefill, then each new
token). A forward is a prefill when its KV cache is empty, which keeps all three exact under the
cache, with left padding and in batches. Hooks live only inside the context: the model is never
changed permanently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from personascope.model import HookedOperation, ModelAdapter, ResidualFn, ResidualHooks
from personascope.vectors import PersonaVector

POSITIONS = ("all", "prompt", "response")
MODES = ("add", "ablate")
DEFAULT_POSITIONS = "response"


@dataclass
class SteeringSpec:
    """One vector at one layer: `coef` is a float or a per-batch-row tensor [B]."""

    vector: torch.Tensor
    layer: int
    coef: float | torch.Tensor = 1.0
    positions: str = DEFAULT_POSITIONS
    mode: str = "add"


def apply_spec(seg: torch.Tensor, spec: SteeringSpec) -> torch.Tensor:
    """One spec's operation on residuals [B, T, d]: add `coef · v` (coef per row allowed) or remove the v̂ part."""
    v = spec.vector.to(device=seg.device, dtype=torch.float32)
    if spec.mode == "ablate":
        u = v / v.norm().clamp(min=1e-12)
        segf = seg.float()
        return (segf - (segf @ u).unsqueeze(-1) * u).to(seg.dtype)
    coef = spec.coef
    if isinstance(coef, torch.Tensor):
        if coef.shape[0] != seg.shape[0]:
            raise ValueError(f"per-row coef has {coef.shape[0]} values for a batch of {seg.shape[0]}")
        coef = coef.to(seg.device, torch.float32).view(-1, 1, 1)
    return (seg.float() + coef * v).to(seg.dtype)


def is_prefill(kwargs: dict) -> bool:
    """Whether a forward's keyword arguments start a sequence (no KV cache, or an empty one)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    try:
        return cache.get_seq_length() == 0
    except (AttributeError, TypeError):
        return False


def entry_modules(model: nn.Module) -> list[nn.Module]:
    """The modules a forward can start from: the model and its base model (span collection calls the latter)."""
    base = getattr(model, "base_model", None)
    return [model] if base is None or base is model else [model, base]


class Steerer(HookedOperation):
    """Context manager (or explicit `attach()`/`remove()` handle) applying steering specs."""

    def __init__(self, model: nn.Module | ModelAdapter, tokenizer=None):
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, tokenizer)
        self._specs: list[SteeringSpec] = []
        self._hooks: ResidualHooks | None = None
        self._marks: list[RemovableHandle] = []
        self._prefill = True

    @property
    def specs(self) -> tuple[SteeringSpec, ...]:
        """The queued specs (read-only view; use `add`, `set_specs` or `select_rows` to change them)."""
        return tuple(self._specs)

    def add(
        self,
        vector: torch.Tensor | PersonaVector,
        layer: int,
        coef: float | torch.Tensor = 1.0,
        positions: str = DEFAULT_POSITIONS,
        mode: str = "add",
        span: str = "response_avg",
    ) -> Steerer:
        """Queue a vector; checks layer, hidden size and (for PersonaVector) the model before any forward."""
        self.adapter.check_layer(layer)
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
        if mode not in MODES:
            raise ValueError(f"unknown steering mode {mode!r}; choose from {', '.join(MODES)}")
        if isinstance(vector, PersonaVector):
            vector.check(self.adapter)
            vector = vector.vector(layer, span)
        if vector.ndim != 1 or vector.shape[0] != self.adapter.hidden_size:
            raise ValueError(f"steering vector has shape {tuple(vector.shape)}, but {self.adapter.name} "
                             f"needs ({self.adapter.hidden_size},)")
        if isinstance(coef, torch.Tensor) and coef.ndim != 1:
            raise ValueError("a per-row coef must be a 1-D tensor with one value per batch row")
        if not isinstance(coef, torch.Tensor) and not torch.isfinite(torch.tensor(float(coef))):
            raise ValueError(f"coef must be finite, got {coef}")
        return self.set_specs([*self._specs, SteeringSpec(vector.detach().float(), layer, coef, positions, mode)])

    def select_rows(self, rows: torch.Tensor | Sequence[int]) -> Steerer:
        """Keep only these batch rows of every per-row coef (when rows leave a running batch)."""
        index = torch.as_tensor(rows, dtype=torch.long).cpu()
        for spec in self._specs:
            if isinstance(spec.coef, torch.Tensor):
                spec.coef = spec.coef[index]
        return self

    # -- hooks
    def _apply(self, h: torch.Tensor, specs: list[SteeringSpec]) -> torch.Tensor:
        h = h.clone()
        for spec in specs:
            if spec.positions == "prompt" and not self._prefill:
                continue
            sl = slice(-1, None) if spec.positions == "response" else slice(None)
            h[:, sl] = apply_spec(h[:, sl], spec)
        return h

    def _fn(self, specs: list[SteeringSpec]) -> ResidualFn:
        def fn(h: torch.Tensor) -> torch.Tensor:
            return self._apply(h, specs)

        return fn

    def attach(self) -> Steerer:
        """Register the hooks (idempotent)."""
        if self._hooks is not None:
            return self
        by_layer: dict[int, list[SteeringSpec]] = {}
        for s in self._specs:
            by_layer.setdefault(s.layer, []).append(s)

        def mark(module, args, kwargs):
            self._prefill = is_prefill(kwargs)

        self._marks = [m.register_forward_pre_hook(mark, with_kwargs=True) for m in entry_modules(self.adapter.model)]
        self._hooks = ResidualHooks(self.adapter, [(layer, self._fn(specs)) for layer, specs in by_layer.items()])
        self._hooks.attach()
        return self



def steer(
    model: nn.Module | ModelAdapter,
    vector: torch.Tensor | PersonaVector,
    layer: int,
    coef: float | torch.Tensor = 1.0,
    positions: str = DEFAULT_POSITIONS,
    mode: str = "add",
    tokenizer=None,
) -> Steerer:
    """A Steerer with one vector: `with steer(model, v, layer=16, coef=2.0): model.generate(...)`."""
    return Steerer(model, tokenizer).add(vector, layer, coef, positions, mode)
