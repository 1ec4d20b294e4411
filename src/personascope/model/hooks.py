"""Residual-stream hooks: the one place that turns a layer index into a hook on a decoder block.

Layer convention: layer 0 is the embedding output, read by a forward pre-hook on block 0; layer
l >= 1 is the output of block l - 1, read by a forward hook on that block. Steering, span
collection, monitoring traces and the server all hook the residual stream through this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import torch
from torch.utils.hooks import RemovableHandle

from .adapter import ModelAdapter, block_output, position_ids_for, with_block_output

# called with the residual stream [B, T, d]; a returned tensor replaces it, None leaves it as is
ResidualFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def add_residual_hook(adapter: ModelAdapter, layer: int, fn: ResidualFn) -> RemovableHandle:
    """Hook `fn` on the residual stream at `layer` (0 = embeddings, l = output of block l - 1)."""
    adapter.check_layer(layer)
    if layer == 0:
        def pre(module, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return adapter.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, output):
        new = fn(block_output(output))
        return None if new is None else with_block_output(output, new)

    return adapter.blocks[layer - 1].register_forward_hook(post)


class HookedOperation:
    """Shared life cycle of Steerer and Guard: forward marks on the entry modules plus residual hooks,
    removed together; usable as a context manager (hooks are removed on exit, even after an exception)."""

    _hooks: ResidualHooks | None
    _marks: list[RemovableHandle]
    _specs: list[Any]

    def attach(self) -> Self:
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def set_specs(self, specs: Sequence[Any]) -> Self:
        """Replace all specs (re-attaching the hooks when attached)."""
        attached = self.attached
        if attached:
            self.remove()
        self._specs = list(specs)
        if attached:
            self.attach()
        return self

    def remove(self) -> None:
        """Remove the hooks (the specs and records stay)."""
        for m in self._marks:
            m.remove()
        self._marks = []
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class ResidualHooks:
    """Context manager (or `attach()`/`remove()` handle) owning residual hooks at several layers."""

    def __init__(self, adapter: ModelAdapter, hooks: Iterable[tuple[int, ResidualFn]]):
        self.adapter = adapter
        self.hooks = list(hooks)
        self._handles: list[RemovableHandle] = []

    def attach(self) -> ResidualHooks:
        """Register the hooks (in order: hooks at one block run in registration order)."""
        if not self._handles:
            try:
                for layer, fn in self.hooks:
                    self._handles.append(add_residual_hook(self.adapter, layer, fn))
            except Exception:
                self.remove()
                raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> ResidualHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def forward_with_residual_hooks(adapter: ModelAdapter, layers: Sequence[int],
                                on_residual: Callable[[int, torch.Tensor], None], ids: torch.Tensor,
                                mask: torch.Tensor) -> None:
    """One forward of the base model (no LM head, no cache) calling on_residual(slot, h) with the residual stream
    at layer layers[slot], so callers reduce activations as they are produced."""
    dev = adapter.device

    def reader(slot: int) -> ResidualFn:
        def read(h: torch.Tensor) -> None:
            on_residual(slot, h)

        return read

    with ResidualHooks(adapter, [(layer, reader(slot)) for slot, layer in enumerate(layers)]):
        adapter.model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 position_ids=position_ids_for(mask).to(dev), use_cache=False)
