"""Persona drift: a conversation's trajectory along persona vectors, one forward per conversation.

Per assistant turn and vector: `pre`, the projection of the last token before the turn (the token
that yields the turn's first token: the paper's predictor) and `response`, the mean projection over
the turn's tokens, each also as a z-score against the vector's normal range. Conversations are
batched with left padding; positions come from the attention mask, so a batch gives what one
conversation alone gives. A conversation that ends with a user turn gets a last point with only `pre`
(the turn about to be generated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from personascope.model import ChatError, ModelAdapter, check_messages, forward_with_residual_hooks, pad_batch, pad_id
from personascope.vectors import PersonaVector

SPANS = ("pre", "response")


@dataclass(frozen=True)
class Normal:
    """A vector's normal range at its layer: mean and sd of the pre-turn and of the response-average projection."""

    pre_mean: float
    pre_sd: float
    response_mean: float
    response_sd: float

    def z(self, span: str, value: float | None) -> float | None:
        """The z-score of a projection of one span (None without a value or a spread)."""
        mean, sd = (self.pre_mean, self.pre_sd) if span == "pre" else (self.response_mean, self.response_sd)
        if value is None or not sd > 0:
            return None
        return (value - mean) / sd


@dataclass(frozen=True)
class DriftVector:
    """A monitored vector: its name, the unit direction's source and layer, and its normal range (if known)."""

    name: str
    vector: PersonaVector
    layer: int
    normal: Normal | None = None

    def unit(self) -> torch.Tensor:
        v = self.vector.vector(self.layer).float()
        return v / v.norm().clamp(min=1e-12)


@dataclass
class TurnPoint:
    """One assistant turn: per vector, pre-turn and response-average projections and their z-scores."""

    turn: int  # 0-based index among the assistant turns
    message: int  # index of the assistant message (of the pending turn's position when `response` is empty)
    n_tokens: int
    pre: dict[str, float] = field(default_factory=dict)
    response: dict[str, float | None] = field(default_factory=dict)
    pre_z: dict[str, float | None] = field(default_factory=dict)
    response_z: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Trajectory:
    """A conversation's trajectory: its turns in order (a pending last turn has n_tokens 0 and no response)."""

    id: str
    layers: dict[str, int]
    turns: list[TurnPoint]

    def series(self, vector: str, span: str = "pre", z: bool = False) -> list[float | None]:
        """One vector's values over the turns (`span` pre or response; z-scores with `z`)."""
        key = f"{span}_z" if z else span
        return [getattr(t, key).get(vector) for t in self.turns]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Layout:
    """Token ids of a rendered conversation and, per assistant turn, its last prompt index and token span."""

    ids: list[int]
    turns: list[tuple[int, int, int, int]]  # (message index, last prompt token, response start, response end)


def layout(adapter: ModelAdapter, messages: Sequence[Mapping]) -> _Layout:
    """Tokenise a conversation piecewise (prompt pieces and answers apart, as `encode_pair`) and locate its turns."""
    msgs = check_messages(list(messages), answer=False)
    ends_open = msgs[-1]["role"] != "assistant"
    full = adapter.render(msgs, add_generation_prompt=ends_open)
    cuts: list[tuple[int, int, int]] = []  # (message index, content start, content end) in characters
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = adapter.render(msgs[:i], add_generation_prompt=True)
        content = m["content"]
        if not full.startswith(prefix) or full.find(content, len(prefix)) != len(prefix):
            raise ChatError(f"messages[{i}]: the chat template does not render the conversation prefix-stably, so the "
                            "turn's tokens cannot be located", f"messages[{i}]")
        cuts.append((i, len(prefix), len(prefix) + len(content)))
    ids: list[int] = []
    turns: list[tuple[int, int, int, int]] = []
    pos = 0
    for i, start, end in cuts:
        ids += adapter.encode_prompt(full[pos:start])
        answer = adapter.encode_prompt(full[start:end])
        turns.append((i, len(ids) - 1, len(ids), len(ids) + len(answer)))
        ids += answer
        pos = end
    if ends_open:
        ids += adapter.encode_prompt(full[pos:])
        turns.append((len(msgs), len(ids) - 1, len(ids), len(ids)))
    elif pos < len(full):
        ids += adapter.encode_prompt(full[pos:])
    return _Layout(ids, turns)


def _group_units(vectors: Sequence[DriftVector]) -> dict[int, tuple[list[str], torch.Tensor]]:
    """Per layer: the vector names read there and their unit directions as columns [d, k]."""
    groups: dict[int, tuple[list[str], list[torch.Tensor]]] = {}
    for dv in vectors:
        names, units = groups.setdefault(dv.layer, ([], []))
        names.append(dv.name)
        units.append(dv.unit())
    return {layer: (names, torch.stack(units, 1)) for layer, (names, units) in groups.items()}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def trajectories(adapter: ModelAdapter, conversations: Sequence[Sequence[Mapping]], vectors: Sequence[DriftVector],
                 ids: Sequence[str] | None = None, batch_size: int = 4) -> list[Trajectory]:
    """The trajectory of each conversation, in input order; conversations run `batch_size` at a time, left-padded."""
    if not vectors:
        raise ValueError("no vectors to monitor")
    for dv in vectors:
        dv.vector.check(adapter)
        adapter.check_layer(dv.layer)
    names = [dv.name for dv in vectors]
    if len(set(names)) != len(names):
        raise ValueError(f"two monitored vectors share a name: {names}")
    groups = _group_units(vectors)
    layer_list = list(groups)
    normals = {dv.name: dv.normal for dv in vectors}
    layers = {dv.name: dv.layer for dv in vectors}
    layouts = [layout(adapter, conv) for conv in conversations]
    out: list[Trajectory] = []
    for start in range(0, len(layouts), batch_size):
        chunk = layouts[start : start + batch_size]
        seqs = [lay.ids for lay in chunk]
        tok_ids, mask = pad_batch(seqs, pad_id(adapter.tokenizer), "left")
        width = tok_ids.shape[1]
        proj: dict[str, torch.Tensor] = {}  # name -> [B, T]

        def read(slot: int, h: torch.Tensor) -> None:
            vnames, units = groups[layer_list[slot]]
            values = (h.float() @ units.to(h.device)).cpu()  # [B, T, k]
            for j, name in enumerate(vnames):
                proj[name] = values[..., j]

        forward_with_residual_hooks(adapter, layer_list, read, tok_ids, mask)
        for b, lay in enumerate(chunk):
            shift = width - len(lay.ids)
            points = []
            for k, (msg, last, r0, r1) in enumerate(lay.turns):
                pt = TurnPoint(turn=k, message=msg, n_tokens=r1 - r0)
                for name in names:
                    row = proj[name][b]
                    pre = float(row[shift + last])
                    resp = float(row[shift + r0 : shift + r1].mean()) if r1 > r0 else None
                    pt.pre[name] = pre
                    pt.response[name] = None if resp is None else _finite(resp)
                    normal = normals[name]
                    pt.pre_z[name] = normal.z("pre", pre) if normal else None
                    pt.response_z[name] = normal.z("response", resp) if normal else None
                points.append(pt)
            idx = start + b
            out.append(Trajectory(ids[idx] if ids is not None else str(idx), dict(layers), points))
    return out


def trajectory(adapter: ModelAdapter, messages: Sequence[Mapping], vectors: Sequence[DriftVector],
               conversation_id: str = "0") -> Trajectory:
    """One conversation's trajectory (one forward)."""
    return trajectories(adapter, [messages], vectors, [conversation_id], batch_size=1)[0]
