"""Persona guard: act on the residual stream only where its projection on a persona direction leaves a normal range.

Two operations beside steering's add and ablate. **cap** clamps the component along v̂ into [lo, hi] at a
layer (a no-op inside the range). **conditional** applies a steering or ablation spec at a position only
while that position's projection on a condition vector, read at a layer at or below the steering layer,
is above a threshold. Both decide per position from the position's own residual, so, like `Steerer`, they
are exact under the KV cache, with left padding and in batches. Positions follow `Steerer`: `response`
(the last position of every forward), `prompt` (the prefill only) and `all`.

A `Guard` keeps one `GuardRecord` per generation (a prefill and the decode steps after it): for each row
and forward whether it acted. Forward k yields generated token k, so `fired[b][k]` says whether token k
was chosen under the guard. Forwards whose input follows an end-of-sequence token (the padding of a
finished row in a batch) and padded positions are never acted on nor counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from personascope.model import HookedOperation, ModelAdapter, ResidualFn, ResidualHooks
from personascope.vectors import PersonaVector

from .steer import DEFAULT_POSITIONS, MODES, POSITIONS, SteeringSpec, apply_spec, entry_modules, is_prefill

GUARD_MODES = ("cap", "conditional")

Bound: TypeAlias = float | torch.Tensor | None


@dataclass
class CapSpec:
    """Clamp h·v̂ into [lo, hi] at `layer`. A bound is None (open), a float, or a per-row tensor [B] (±inf: open)."""

    vector: torch.Tensor
    layer: int
    lo: Bound = None
    hi: Bound = None
    positions: str = DEFAULT_POSITIONS


@dataclass
class ConditionalSpec:
    """Apply `op` (add or ablate, at its layer and positions) where h·ĉ at `condition_layer` exceeds `threshold`.

    `threshold` is a float or a per-row tensor [B] (+inf: never fires for that row).
    """

    condition: torch.Tensor
    condition_layer: int
    threshold: float | torch.Tensor
    op: SteeringSpec


GuardSpec = CapSpec | ConditionalSpec


@dataclass
class GuardRecord:
    """One generation: `fired[b][k]` is True when the guard acted in forward k (which yields token k) of row b."""

    fired: list[list[bool]] = field(default_factory=list)

    @property
    def touched(self) -> list[int]:
        """Per row: how many forwards (generated tokens) the guard acted on."""
        return [sum(row) for row in self.fired]


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().float()
    return v / v.norm().clamp(min=1e-12)


def _per_row(value: Bound, default: float, batch: int, device, name: str) -> torch.Tensor:
    """A bound or threshold as a float32 column [B, 1]."""
    if value is None:
        return torch.full((batch, 1), default, device=device)
    if isinstance(value, torch.Tensor):
        if value.shape[0] != batch:
            raise ValueError(f"per-row {name} has {value.shape[0]} values for a batch of {batch}")
        return value.to(device, torch.float32).view(-1, 1)
    return torch.full((batch, 1), float(value), device=device)


def _check_number(value: Bound, name: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.ndim != 1:
            raise ValueError(f"a per-row {name} must be a 1-D tensor with one value per batch row")
    elif value is not None and math.isnan(float(value)):
        raise ValueError(f"{name} must be a number, got {value}")


def stop_ids(adapter: ModelAdapter) -> set[int]:
    """The model's end-of-sequence token ids (tokenizer and generation config)."""
    ids: set[int] = set()
    for src in (adapter.tokenizer, getattr(adapter.model, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(x) for x in eos)
    return ids


class Guard(HookedOperation):
    """Context manager (or `attach()`/`remove()` handle) applying cap and conditional specs, recording where it acts."""

    def __init__(self, model: nn.Module | ModelAdapter, tokenizer=None, stops: set[int] | None = None):
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, tokenizer)
        self.stops = stop_ids(self.adapter) if stops is None else set(stops)
        self._specs: list[GuardSpec] = []
        self.records: list[GuardRecord] = []
        self._hooks: ResidualHooks | None = None
        self._marks: list[RemovableHandle] = []
        self._depth = 0
        self._prefill = True
        self._valid: torch.Tensor | None = None  # [B, T] positions of this forward that may be acted on
        self._done: torch.Tensor | None = None  # [B] rows whose answer has ended
        self._acted: torch.Tensor | None = None  # [B] acted somewhere in this forward
        self._decisions: dict[int, torch.Tensor] = {}  # conditional spec index -> [B, T] fire mask
        self._last: list[bool] = []

    # -- specs
    @property
    def specs(self) -> tuple[GuardSpec, ...]:
        return tuple(self._specs)

    def _direction(self, vector: torch.Tensor | PersonaVector, layer: int, span: str) -> torch.Tensor:
        self.adapter.check_layer(layer)
        if isinstance(vector, PersonaVector):
            vector.check(self.adapter)
            vector = vector.vector(layer, span)
        if vector.ndim != 1 or vector.shape[0] != self.adapter.hidden_size:
            raise ValueError(f"guard vector has shape {tuple(vector.shape)}, but {self.adapter.name} "
                             f"needs ({self.adapter.hidden_size},)")
        return vector.detach().float()

    def cap(self, vector: torch.Tensor | PersonaVector, layer: int, lo: Bound = None, hi: Bound = None,
            positions: str = DEFAULT_POSITIONS, span: str = "response_avg") -> Guard:
        """Queue a cap: clamp the projection on v̂ at `layer` into [lo, hi] (None: open on that side)."""
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
        _check_number(lo, "lo")
        _check_number(hi, "hi")
        if lo is None and hi is None:
            raise ValueError("a cap needs lo, hi or both")
        if isinstance(lo, int | float) and isinstance(hi, int | float) and lo > hi:
            raise ValueError(f"cap range is empty: lo {lo} > hi {hi}")
        return self.set_specs([*self._specs, CapSpec(self._direction(vector, layer, span), layer, lo, hi, positions)])

    def conditional(self, condition: torch.Tensor | PersonaVector, condition_layer: int,
                    threshold: float | torch.Tensor, vector: torch.Tensor | PersonaVector | None = None,
                    layer: int | None = None, coef: float | torch.Tensor = 1.0,
                    positions: str = DEFAULT_POSITIONS, mode: str = "add", span: str = "response_avg") -> Guard:
        """Queue a conditional op: add `coef · v` (or ablate v̂) at `layer` where h·ĉ > threshold.

        `vector` and `layer` default to the condition's; the condition layer must not be above `layer`
        (a forward reaches the condition first, so the decision is known when the op runs).
        """
        layer = condition_layer if layer is None else layer
        if condition_layer > layer:
            raise ValueError(f"the condition layer {condition_layer} is above the steering layer {layer}: "
                             "a forward must read the condition before it steers")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)}")
        if mode not in MODES:
            raise ValueError(f"unknown steering mode {mode!r}; choose from {', '.join(MODES)}")
        _check_number(threshold, "threshold")
        if isinstance(coef, torch.Tensor) and coef.ndim != 1:
            raise ValueError("a per-row coef must be a 1-D tensor with one value per batch row")
        cond = self._direction(condition, condition_layer, span)
        v = self._direction(condition if vector is None else vector, layer, span)
        op = SteeringSpec(v, layer, coef, positions, mode)
        return self.set_specs([*self._specs, ConditionalSpec(cond, condition_layer, threshold, op)])

    def select_rows(self, rows: torch.Tensor | Sequence[int]) -> Guard:
        """Keep only these batch rows (per-row bounds, thresholds, coefs and the current record)."""
        index = torch.as_tensor(rows, dtype=torch.long).cpu()
        keep = index.tolist()

        def sub(x):
            return x[index.to(x.device)] if isinstance(x, torch.Tensor) else x

        for s in self._specs:
            if isinstance(s, CapSpec):
                s.lo, s.hi = sub(s.lo), sub(s.hi)
            else:
                s.threshold = sub(s.threshold)
                s.op.coef = sub(s.op.coef)
        if self.records:
            self.records[-1].fired = [self.records[-1].fired[i] for i in keep]
        if self._done is not None:
            self._done = self._done[index.to(self._done.device)]
        self._last = [self._last[i] for i in keep] if self._last else []
        return self

    # -- results
    @property
    def last(self) -> GuardRecord | None:
        """The record of the most recent generation (None before any forward)."""
        return self.records[-1] if self.records else None

    @property
    def step_fired(self) -> list[bool]:
        """Per row: whether the guard acted in the most recent forward."""
        return list(self._last)

    # -- forwards
    def _begin(self, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            self._valid = self._acted = None
            return
        batch, t = ref.shape[0], ref.shape[1]
        dev = ref.device
        self._prefill = is_prefill(kwargs)
        if self._prefill or self._done is None or self._done.shape[0] != batch:
            self.records.append(GuardRecord([[] for _ in range(batch)]))
            self._done = torch.zeros(batch, dtype=torch.bool, device=dev)
        valid = torch.ones(batch, t, dtype=torch.bool, device=dev)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] >= t:
            valid &= mask[:, -t:].to(dev).bool()
        if not self._prefill and ids is not None and self.stops:
            stops = torch.tensor(sorted(self.stops), device=dev)
            ended = self._done.view(-1, 1) | (torch.isin(ids, stops).cumsum(1) > 0)
            self._done = ended[:, -1]
            valid &= ~ended
        self._valid = valid
        self._acted = torch.zeros(batch, dtype=torch.bool, device=dev)
        self._decisions = {}

    def _end(self) -> None:
        if self._acted is None:
            return
        self._last = self._acted.cpu().tolist()
        if self.records:
            for row, fired in zip(self.records[-1].fired, self._last, strict=False):
                row.append(fired)
        self._valid = self._acted = None
        self._decisions = {}

    def _positions(self, positions: str, h: torch.Tensor) -> torch.Tensor | None:
        """[B, T] where this forward may be acted on for these positions (None: nowhere)."""
        if positions == "prompt" and not self._prefill:
            return None
        valid = self._valid
        if valid is None or valid.shape != h.shape[:2]:
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if positions == "response":
            only_last = torch.zeros_like(valid)
            only_last[:, -1] = True
            valid = valid & only_last
        return valid.to(h.device)

    def _fn(self, layer: int) -> ResidualFn:
        def fn(h: torch.Tensor) -> torch.Tensor | None:
            changed = False
            for i, s in enumerate(self._specs):  # conditions read at this layer, before any op here
                if isinstance(s, ConditionalSpec) and s.condition_layer == layer:
                    where = self._positions(s.op.positions, h)
                    if where is None:
                        continue
                    thr = _per_row(s.threshold, math.inf, h.shape[0], h.device, "threshold")
                    self._decisions[i] = (h.float() @ _unit(s.condition).to(h.device) > thr) & where
            for i, s in enumerate(self._specs):
                if isinstance(s, CapSpec) and s.layer == layer:
                    where = self._positions(s.positions, h)
                    if where is None:
                        continue
                    u = _unit(s.vector).to(h.device)
                    hf = h.float()
                    p = hf @ u
                    lo = _per_row(s.lo, -math.inf, h.shape[0], h.device, "lo")
                    hi = _per_row(s.hi, math.inf, h.shape[0], h.device, "hi")
                    target = torch.maximum(torch.minimum(p, hi), lo)
                    act = (target != p) & where
                    new = (hf + (target - p).unsqueeze(-1) * u).to(h.dtype)
                elif isinstance(s, ConditionalSpec) and s.op.layer == layer:
                    act = self._decisions.get(i)
                    if act is None:
                        continue
                    new = apply_spec(h, s.op)
                else:
                    continue
                if bool(act.any()):
                    h = torch.where(act.unsqueeze(-1), new, h)
                    changed = True
                    if self._acted is not None and self._acted.shape[0] == act.shape[0]:
                        self._acted |= act.any(1).to(self._acted.device)
            return h if changed else None

        return fn

    def attach(self) -> Guard:
        """Register the hooks (idempotent)."""
        if self._hooks is not None:
            return self
        layers = sorted({la for s in self._specs for la in ((s.layer,) if isinstance(s, CapSpec)
                                                             else (s.condition_layer, s.op.layer))})

        def pre(module, args, kwargs):
            if self._depth == 0:
                self._begin(kwargs)
            self._depth += 1

        def post(module, args, output):
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._end()

        self._depth = 0
        for m in entry_modules(self.adapter.model):
            self._marks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            self._marks.append(m.register_forward_hook(post, always_call=True))
        self._hooks = ResidualHooks(self.adapter, [(layer, self._fn(layer)) for layer in layers])
        self._hooks.attach()
        return self

