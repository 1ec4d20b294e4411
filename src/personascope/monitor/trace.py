"""Monitoring primitives: projections of activations on a persona vector, before and during generation.

- `project_prompts`: the scalar projection of the last prompt token (or any span) on v̂, batched.
- `trace_generation`: one projection per generated token, recorded live by a forward hook on block
  l − 1 that reads the last position of every forward (prefill → last prompt token, each later
  step → the token fed back), plus one final cached forward for the last generated token.
- `trace_answers`: the same trace for given answers, teacher-forced (e.g. a dataset's responses).

The paper's two monitoring experiments are run by `monitor_run.run_monitor` and reported by
`monitor_report`.
"""

from __future__ import annotations

import inspect
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

from personascope.model import (
    SPANS,
    ModelAdapter,
    ResidualHooks,
    collect_spans,
    forward_with_residual_hooks,
    pad_batch,
    pad_id,
    position_ids_for,
)
from personascope.traits import Trait
from personascope.util import (
    pearson_r,  # noqa: F401  (part of the monitoring API)
    seeded,
)
from personascope.vectors import PersonaVector

__all__ = [
    "ProjectionTable", "Trace", "calibrate", "pearson_r", "project_prompts", "token_strings", "trace_answers",
    "trace_generation", "unit_rows",
]

log = logging.getLogger(__name__)

PromptLike = str | tuple[str | None, str]
VectorLike: TypeAlias = PersonaVector | torch.Tensor



# ----------------------------------------------------------------------------- inputs


def _adapter(model_or_adapter, tokenizer=None) -> ModelAdapter:
    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    if tokenizer is None:
        raise ValueError("pass a ModelAdapter, or a model together with tokenizer=")
    return ModelAdapter(model_or_adapter, tokenizer)


def render_prompt(adapter: ModelAdapter, prompt: PromptLike) -> str:
    """A rendered prompt string as is, or a (system, user) pair through the chat template."""
    if isinstance(prompt, str):
        return prompt
    system, user = prompt
    return adapter.prompt(user, system)


def unit_rows(adapter: ModelAdapter, vector: VectorLike, layers: Sequence[int],
              vector_span: str = "response_avg") -> dict[int, torch.Tensor]:
    """v̂ for each layer (float32): a PersonaVector or [L + 1, d] tensor gives row l, a [d] tensor is used as is."""
    if isinstance(vector, PersonaVector):
        vector.check(adapter)
        rows = {layer: vector.vector(layer, vector_span) for layer in layers}
    elif vector.ndim == 2:
        if vector.shape != (adapter.n_layers + 1, adapter.hidden_size):
            raise ValueError(f"vector has shape {tuple(vector.shape)}, but {adapter.name} needs "
                             f"({adapter.n_layers + 1}, {adapter.hidden_size})")
        rows = {layer: vector[layer] for layer in layers}
    elif vector.ndim == 1:
        if vector.shape[0] != adapter.hidden_size:
            raise ValueError(f"vector has size {vector.shape[0]}, but {adapter.name} has hidden size "
                             f"{adapter.hidden_size}")
        rows = {layer: vector for layer in layers}
    else:
        raise ValueError(f"vector must be [d] or [L + 1, d], got shape {tuple(vector.shape)}")
    out = {}
    for layer, v in rows.items():
        adapter.check_layer(layer)
        v = v.detach().float()
        out[layer] = v / v.norm().clamp(min=1e-12)
    return out


def _layers(layer: int | Sequence[int]) -> list[int]:
    return [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]


# ----------------------------------------------------------------------------- projections


@dataclass
class ProjectionTable:
    """Scalar projections on v̂: `values[i][j]` for prompt i at `layers[j]` (rows in input order)."""

    prompts: list[str]
    layers: list[int]
    span: str
    values: list[list[float]]

    def column(self, layer: int | None = None) -> list[float]:
        """One layer's projections for every prompt (the only layer when there is one)."""
        j = 0 if layer is None else self.layers.index(layer)
        return [row[j] for row in self.values]

    @property
    def rows(self) -> list[dict]:
        return [{"prompt": p, **{f"layer_{la}": v for la, v in zip(self.layers, row, strict=True)}}
                for p, row in zip(self.prompts, self.values, strict=True)]


def project_prompts(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    vector: VectorLike,
    layer: int | Sequence[int],
    span: str = "prompt_last",
    answers: Sequence[str] | None = None,
    batch_size: int = 8,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> ProjectionTable:
    """Batched projections of a span (default: the last prompt token) on v̂ at one or more layers.

    Prompts are rendered prompt strings or (system, user) pairs; with `answers`, the response
    spans (`response_avg`) are available too. Padding-independent (activations.collect_spans).
    """
    adapter = _adapter(model_or_adapter, tokenizer)
    if span not in SPANS:
        raise ValueError(f"unknown span {span!r}; choose from {', '.join(SPANS)}")
    layers = _layers(layer)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    if answers is not None and len(answers) != len(rendered):
        raise ValueError(f"{len(answers)} answers for {len(rendered)} prompts")
    items = [adapter.encode_pair(p, answers[i]) if answers is not None else (adapter.encode_prompt(p), [])
             for i, p in enumerate(rendered)]
    if not items:
        return ProjectionTable([], layers, span, [])
    spans, _ = collect_spans(adapter, items, layers, batch_size)
    acts = spans[span]  # [N, nL, d]
    values = torch.stack([acts[:, j] @ units[la] for j, la in enumerate(layers)], 1)
    return ProjectionTable(rendered, layers, span, values.tolist())


# ----------------------------------------------------------------------------- per-token traces


@dataclass
class Trace:
    """One answer's tokens (as strings) with the projection of the residual at each token's position."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    values: dict[int, list[float]]  # layer -> one projection per token
    prompt_value: dict[int, float]  # layer -> projection of the last prompt token

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def at(self, layer: int | None = None) -> list[float]:
        """The per-token projections at one layer (the first traced layer by default)."""
        return self.values[next(iter(self.values)) if layer is None else layer]


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """One string per token whose concatenation is the decoded text (multi-byte characters go to their last token)."""
    out: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if cur.endswith("\ufffd") and i < len(ids) - 1:
            out.append("")  # an incomplete UTF-8 sequence: its text appears with a later token
            continue
        if cur.startswith(prev):
            out.append(cur[len(prev):])
            prev = cur
        else:  # decoding is not prefix-stable here: fall back to the token alone
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(piece)
            prev += piece
    return out


def _stop_ids(adapter: ModelAdapter) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(adapter.model, "generation_config", None), adapter.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
    return ids


class LastPositionRecorder:
    """Residual hooks that record v̂ · h[:, -1] at each layer for every forward of the model."""

    def __init__(self, adapter: ModelAdapter, units: dict[int, torch.Tensor]):
        self.units = units
        self.records: dict[int, list[torch.Tensor]] = {layer: [] for layer in units}
        self._hooks = ResidualHooks(adapter, [(layer, self._recorder(layer)) for layer in units])

    def _recorder(self, layer: int):
        def record(h: torch.Tensor) -> None:
            u = self.units[layer].to(h.device)
            self.records[layer].append((h[:, -1].float() @ u).cpu())

        return record

    def __enter__(self) -> LastPositionRecorder:
        self._hooks.attach()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.remove()

    def stacked(self, layer: int) -> torch.Tensor:
        return torch.stack(self.records[layer], 1)  # [B, n_forwards]


def _forward_last(adapter: ModelAdapter, out, full_mask: torch.Tensor) -> None:
    """Run the last generated token through the model on generate's KV cache (a full forward without one)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    pos = position_ids_for(full_mask)
    if cache is None:
        adapter.model(input_ids=out.sequences, attention_mask=full_mask, position_ids=pos, use_cache=False)
        return
    params = inspect.signature(adapter.model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    adapter.model(input_ids=out.sequences[:, -1:], attention_mask=full_mask, position_ids=pos[:, -1:],
                  use_cache=True, **{key: cache})


@torch.no_grad()
def trace_generation(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    vector: VectorLike,
    layers: int | Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> list[Trace]:
    """Generate answers to prompts in one left-padded batch and trace every generated token's projection.

    A hook on block l − 1 records the last position of every forward: the prefill gives the last
    prompt token, each later step the previously generated token; one final cached forward adds
    the last generated token. So `trace.at(l)[i]` is the projection at the position of token i.
    Tokens stop before the first end-of-sequence token. Active Steerers apply as usual.
    """
    adapter = _adapter(model_or_adapter, tokenizer)
    layers = _layers(layers)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    if not rendered:
        return []
    pid = pad_id(adapter.tokenizer)
    ids, mask = pad_batch([adapter.encode_prompt(p) for p in rendered], pid, "left")
    dev = adapter.device
    ids, mask = ids.to(dev), mask.to(dev)
    greedy = temperature <= 0
    with LastPositionRecorder(adapter, units) as rec, seeded(seed):
        out = adapter.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
            pad_token_id=pid, return_dict_in_generate=True, use_cache=True,
        )
        new = out.sequences[:, ids.shape[1]:]
        n_new = new.shape[1]
        if n_new:
            # the last generated token was never fed back: one more cached forward reads its residual
            _forward_last(adapter, out, torch.cat([mask, torch.ones_like(new)], 1))
    stops = _stop_ids(adapter)
    traces = []
    per_layer = {layer: rec.stacked(layer) for layer in layers}  # [B, 1 + n_new]
    for b, prompt in enumerate(rendered):
        row = new[b].tolist()
        n = next((i for i, t in enumerate(row) if t in stops), len(row))
        row = row[:n]
        traces.append(Trace(
            prompt=prompt, tokens=token_strings(adapter.tokenizer, row), token_ids=row,
            values={la: per_layer[la][b, 1 : 1 + n].tolist() for la in layers},
            prompt_value={la: float(per_layer[la][b, 0]) for la in layers},
        ))
    return traces


@torch.no_grad()
def trace_answers(
    model_or_adapter,
    prompts: Sequence[PromptLike],
    answers: Sequence[str | Sequence[int]],
    vector: VectorLike,
    layers: int | Sequence[int],
    batch_size: int = 8,
    vector_span: str = "response_avg",
    tokenizer=None,
) -> list[Trace]:
    """Teacher-forced traces of given answers (text or token ids): one forward over prompt + answer each."""
    adapter = _adapter(model_or_adapter, tokenizer)
    layers = _layers(layers)
    units = unit_rows(adapter, vector, layers, vector_span)
    rendered = [render_prompt(adapter, p) for p in prompts]
    items = []
    for p, a in zip(rendered, answers, strict=True):
        p_ids = adapter.encode_prompt(p)
        a_ids = adapter.encode_pair(p, a)[1] if isinstance(a, str) else list(a)
        items.append((p_ids, a_ids))
    traces: list[Trace] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids, mask = pad_batch([p + a for p, a in chunk], pad_id(adapter.tokenizer), "right")
        full: dict[int, torch.Tensor] = {}

        def keep(layer: int, h: torch.Tensor) -> None:
            full[layer] = (h.float() @ units[layer].to(h.device)).cpu()  # [B, T]

        forward_with_residual_hooks(adapter, layers, lambda slot, h: keep(layers[slot], h), ids, mask)
        for j, (p_ids, a_ids) in enumerate(chunk):
            n_p = len(p_ids)
            traces.append(Trace(
                prompt=rendered[start + j], tokens=token_strings(adapter.tokenizer, a_ids), token_ids=a_ids,
                values={la: full[la][j, n_p : n_p + len(a_ids)].tolist() for la in layers},
                prompt_value={la: float(full[la][j, n_p - 1]) for la in layers},
            ))
    return traces


# ----------------------------------------------------------------------------- statistics


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    known = [x for x in xs if x is not None]
    return statistics.fmean(known) if known else None



# ----------------------------------------------------------------------------- shared by watch


def calibrate(adapter: ModelAdapter, vector: VectorLike, layer: int, trait: Trait,
              n_questions: int = 3) -> tuple[float, float]:
    """Mean last-prompt-token projection under the most suppressing and most eliciting system prompts."""
    from personascope.traits import TraitError, load_ladder

    try:
        ladder = load_ladder(trait.name)
        low_sys, high_sys = ladder[0], ladder[-1]
    except TraitError:
        low_sys, high_sys = trait.system_prompt("neg", 0), trait.system_prompt("pos", 0)
    qs = (trait.eval_questions or trait.extract_questions)[:n_questions]
    table = project_prompts(adapter, [(low_sys, q) for q in qs] + [(high_sys, q) for q in qs], vector, layer)
    vals = table.column()
    return statistics.fmean(vals[: len(qs)]), statistics.fmean(vals[len(qs):])

