"""Steering: add `coef · v[l]` to the output of block l − 1 (or ablate v̂) while the model runs.

Positions (DESIGN.md §3): `all` (every position of every forward), `prompt` (the prefill forward
only) and `response` (the last position of every forward: the last prompt token at prefill, then
each new token). A forward is a prefill when its KV cache is empty, which keeps all three exact
under the cache, with left padding and in batches. Hooks live only inside the context: the
model is never changed permanently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter import ModelAdapter, block_output, with_block_output
from .vectors import PersonaVector

POSITIONS = ("all", "prompt", "response")
MODES = ("add", "ablate")


@dataclass
class SteeringSpec:
    """One vector at one layer: `coef` is a float or a per-batch-row tensor [B]."""

    vector: torch.Tensor
    layer: int
    coef: float | torch.Tensor = 1.0
    positions: str = "all"
    mode: str = "add"


def _is_prefill(kwargs: dict) -> bool:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    try:
        return cache.get_seq_length() == 0
    except (AttributeError, TypeError):
        return False


class Steerer:
    """Context manager (or explicit `attach()`/`remove()` handle) applying steering specs."""

    def __init__(self, model: nn.Module | ModelAdapter, tokenizer=None):
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, tokenizer)
        self.specs: list[SteeringSpec] = []
        self._handles: list = []
        self._prefill = True

    def add(
        self,
        vector: torch.Tensor | PersonaVector,
        layer: int,
        coef: float | torch.Tensor = 1.0,
        positions: str = "all",
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
        self.specs.append(SteeringSpec(vector.detach().float(), layer, coef, positions, mode))
        if self._handles:  # already attached: re-attach to include the new spec
            self.remove()
            self.attach()
        return self

    # -- hooks
    def _apply(self, h: torch.Tensor, specs: list[SteeringSpec]) -> torch.Tensor:
        h = h.clone()
        for spec in specs:
            if spec.positions == "prompt" and not self._prefill:
                continue
            sl = slice(-1, None) if spec.positions == "response" else slice(None)
            seg = h[:, sl]
            v = spec.vector.to(device=h.device, dtype=torch.float32)
            if spec.mode == "ablate":
                u = v / v.norm().clamp(min=1e-12)
                segf = seg.float()
                seg = (segf - (segf @ u).unsqueeze(-1) * u).to(h.dtype)
            else:
                coef = spec.coef
                if isinstance(coef, torch.Tensor):
                    if coef.shape[0] != h.shape[0]:
                        raise ValueError(f"per-row coef has {coef.shape[0]} values for a batch of {h.shape[0]}")
                    coef = coef.to(h.device, torch.float32).view(-1, 1, 1)
                seg = (seg.float() + coef * v).to(h.dtype)
            h[:, sl] = seg
        return h

    def attach(self) -> Steerer:
        if self._handles:
            return self
        by_layer: dict[int, list[SteeringSpec]] = {}
        for s in self.specs:
            by_layer.setdefault(s.layer, []).append(s)

        def mark(module, args, kwargs):
            self._prefill = _is_prefill(kwargs)

        self._handles.append(self.adapter.model.register_forward_pre_hook(mark, with_kwargs=True))
        for layer, specs in by_layer.items():
            if layer == 0:
                def pre(module, args, kwargs, specs=specs):
                    if args:
                        return (self._apply(args[0], specs), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": self._apply(kwargs["hidden_states"], specs)}

                self._handles.append(self.adapter.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, output, specs=specs):
                    return with_block_output(output, self._apply(block_output(output), specs))

                self._handles.append(self.adapter.blocks[layer - 1].register_forward_hook(post))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Steerer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def steer(
    model: nn.Module | ModelAdapter,
    vector: torch.Tensor | PersonaVector,
    layer: int,
    coef: float | torch.Tensor = 1.0,
    positions: str = "response",
    mode: str = "add",
    tokenizer=None,
) -> Steerer:
    """A Steerer with one vector: `with steer(model, v, layer=16, coef=2.0): model.generate(...)`."""
    return Steerer(model, tokenizer).add(vector, layer, coef, positions, mode)
