"""Does a persona vector carry its trait? Four checks from forward passes only, per layer.

- held-out separation: a vector built from some questions' pairs separates the pos from the neg answers
  (response-average projection) on the other questions (AUROC);
- stability: cosine between vectors built from two disjoint halves of the questions;
- prompt separation: the last prompt token's projection follows the trait's system-prompt ladder (Spearman
  between rung and projection);
- label agreement: on answers the built-in models wrote and a reader labelled (opposite / neutral / shown),
  the response-average projection ranks shown answers first (AUROC) and follows the level (Spearman).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from personascope.judges import load_real_set
from personascope.model import ModelAdapter, collect_spans
from personascope.traits import Trait, TraitError, load_ladder
from personascope.util import auroc, spearman


@dataclass(frozen=True)
class Thresholds:
    """What a vector must reach at its chosen layer to be called valid (docs/vectors.md explains them)."""

    held_out_auroc: float = 0.95
    split_half_cosine: float = 0.9
    ladder_spearman: float = 0.8
    label_auroc: float = 0.8


THRESHOLDS = Thresholds()
MIN_CLASS = 3  # answers each side of a label AUROC needs before it is reported
Curve = list[float | None]


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


@dataclass
class ValidityReport:
    """Per-layer checks of one vector (None where a check could not be computed) and the layer they judge."""

    layers: list[int]
    held_out_auroc: Curve
    split_half_cosine: Curve
    ladder_spearman: Curve | None = None
    label_auroc: Curve | None = None
    label_spearman: Curve | None = None
    layer: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def at(self, layer: int | None = None) -> dict[str, float | None]:
        """Every check's value at `layer` (default: the report's chosen layer)."""
        layer = self.layer if layer is None else layer
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in the report (layers {self.layers[0]}–{self.layers[-1]})")
        i = self.layers.index(layer)
        return {name: (curve[i] if curve is not None else None) for name, curve in self.curves().items()}

    def curves(self) -> dict[str, Curve | None]:
        return {"held_out_auroc": self.held_out_auroc, "split_half_cosine": self.split_half_cosine,
                "ladder_spearman": self.ladder_spearman, "label_auroc": self.label_auroc,
                "label_spearman": self.label_spearman}

    def problems(self, layer: int | None = None, thresholds: Thresholds = THRESHOLDS) -> list[str]:
        """One line per check that misses its threshold at `layer` (unmeasured checks are not failures)."""
        values = self.at(layer)
        out = []
        for name, limit in asdict(thresholds).items():
            v = values.get(name)
            if v is not None and v < limit:
                out.append(f"{name.replace('_', ' ')} {v:.2f} < {limit:g}")
        return out

    @property
    def valid(self) -> bool:
        return self.layer is not None and not self.problems()

    def to_dict(self) -> dict:
        return {**asdict(self), "valid": self.valid, "at_layer": self.at() if self.layer is not None else None,
                "problems": self.problems() if self.layer is not None else [], "thresholds": asdict(THRESHOLDS)}

    @classmethod
    def from_dict(cls, d: dict) -> ValidityReport:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


# ------------------------------------------------------------------------- checks


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def held_out_auroc(pos: torch.Tensor, neg: torch.Tensor, questions: Sequence[int], n_folds: int = 2) -> Curve:
    """Per layer: AUROC of held-out pos vs neg answers projected on the vector of the other questions' pairs.

    `pos`, `neg`: [P, L, d] response averages of the kept pairs, `questions[i]` pair i's question. The questions
    are dealt into `n_folds` folds; each fold is scored by the vector of the others, and the AUROC is computed
    on all out-of-fold projections together.
    """
    qs = sorted(set(questions))
    if len(qs) < 2:
        return [None] * pos.shape[1]
    fold_of = {q: i % n_folds for i, q in enumerate(qs)}
    folds = torch.tensor([fold_of[q] for q in questions])
    p_proj, n_proj = torch.zeros(pos.shape[:2]), torch.zeros(neg.shape[:2])
    for f in range(n_folds):
        test, train = folds == f, folds != f
        if not test.any() or not train.any():
            continue
        v = _unit(pos[train].mean(0) - neg[train].mean(0))  # [L, d]
        p_proj[test] = torch.einsum("pld,ld->pl", pos[test], v)
        n_proj[test] = torch.einsum("pld,ld->pl", neg[test], v)
    labels = [1] * len(pos) + [0] * len(neg)
    return [_clean(auroc(torch.cat([p_proj[:, j], n_proj[:, j]]).tolist(), labels)) for j in range(pos.shape[1])]


def split_half_cosine(pos: torch.Tensor, neg: torch.Tensor, questions: Sequence[int]) -> Curve:
    """Per layer: cosine between the vectors of two disjoint halves of the questions (alternate questions)."""
    qs = sorted(set(questions))
    if len(qs) < 2:
        return [None] * pos.shape[1]
    half = torch.tensor([qs.index(q) % 2 for q in questions]).bool()
    a = pos[half].mean(0) - neg[half].mean(0)
    b = pos[~half].mean(0) - neg[~half].mean(0)
    return [_clean(x) for x in torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()]


@dataclass
class Probe:
    """Activations that do not depend on the vector ([N, L, d]) with a per-row target, so many vectors can be
    checked against one forward pass."""

    acts: torch.Tensor
    target: list[float]


def _curve(stat, probe: Probe, vector: torch.Tensor) -> Curve:
    proj = torch.einsum("nld,ld->nl", probe.acts, _unit(vector.float()))
    return [_clean(stat(proj[:, j].tolist())) for j in range(proj.shape[1])]


def ladder_probe(adapter: ModelAdapter, trait: Trait, n_questions: int = 10, batch_size: int = 16) -> Probe | None:
    """Last-prompt-token activations of rung × question prompts of the trait's system-prompt ladder (its
    evaluation questions, not the extraction ones), target = rung; None when the trait has no ladder."""
    try:
        ladder = load_ladder(trait.name)
    except TraitError:
        return None
    questions = trait.eval_questions[:n_questions]
    prompts = [(rung, adapter.prompt(q, system)) for rung, system in enumerate(ladder) for q in questions]
    items: list[tuple[list[int], list[int]]] = [(adapter.encode_prompt(p), []) for _, p in prompts]
    spans, _ = collect_spans(adapter, items, batch_size=batch_size)
    return Probe(spans["prompt_last"], [float(r) for r, _ in prompts])


def label_probe(adapter: ModelAdapter, trait: str, batch_size: int = 8) -> Probe | None:
    """Response averages of the labelled real answers of `trait` (refusals and incoherent ones left out), each
    read after its question alone (no system prompt, so only the text counts), target = level 0/1/2."""
    rows = [r for r in load_real_set([trait]) if not r.refusal and not r.incoherent and r.level is not None]
    if len(rows) < 3:
        return None
    items = [adapter.encode_pair(adapter.prompt(r.question), r.answer) for r in rows]
    spans, _ = collect_spans(adapter, items, batch_size=batch_size)
    return Probe(spans["response_avg"], [float(r.level) for r in rows if r.level is not None])


def ladder_curve(probe: Probe, vector: torch.Tensor) -> Curve:
    """Per layer: Spearman between ladder rung and the last prompt token's projection on `vector` [L, d]."""
    return _curve(lambda p: spearman(probe.target, p), probe, vector)


def label_curves(probe: Probe, vector: torch.Tensor) -> tuple[Curve | None, Curve | None]:
    """Per layer: AUROC (shown vs the rest, when each side has MIN_CLASS answers) and Spearman (level vs
    projection, when two levels occur) on the labelled answers."""
    shown = [int(t == 2) for t in probe.target]
    au = (_curve(lambda p: auroc(p, shown), probe, vector)
          if MIN_CLASS <= sum(shown) <= len(shown) - MIN_CLASS else None)
    sp = _curve(lambda p: spearman(probe.target, p), probe, vector) if len(set(probe.target)) > 1 else None
    return au, sp


def ladder_spearman(adapter: ModelAdapter, vector: torch.Tensor, trait: Trait, n_questions: int = 10
                    ) -> tuple[Curve | None, int]:
    """`ladder_curve` on a fresh `ladder_probe`, and the number of prompts (None, 0 without a ladder)."""
    probe = ladder_probe(adapter, trait, n_questions)
    return (None, 0) if probe is None else (ladder_curve(probe, vector), len(probe.target))


def label_agreement(adapter: ModelAdapter, vector: torch.Tensor, trait: str) -> tuple[Curve | None, Curve | None, int]:
    """`label_curves` on a fresh `label_probe`, and the number of answers ((None, None, 0) without labels)."""
    probe = label_probe(adapter, trait)
    if probe is None:
        return None, None, 0
    au, sp = label_curves(probe, vector)
    return au, sp, len(probe.target)


def choose_layer(report: ValidityReport) -> int:
    """The layer where the checks are best on average, among the middle layers (a fourth to 7/8 of the depth).

    Each layer's score is the mean of its held-out AUROC, (ladder Spearman + 1) / 2 and label AUROC, where
    measured; ties go to the earlier layer.
    """
    n = len(report.layers)
    lo, hi = max(1, n // 4), max(2, (7 * n) // 8)

    def score(i: int) -> float:
        parts = [report.held_out_auroc[i]]
        if report.ladder_spearman is not None:
            s = report.ladder_spearman[i]
            parts.append(None if s is None else (s + 1) / 2)
        if report.label_auroc is not None:
            parts.append(report.label_auroc[i])
        vals = [p for p in parts if p is not None]
        return sum(vals) / len(vals) if vals else -1.0

    best = max(range(lo, min(hi, n)), key=lambda i: (score(i), -i))
    return report.layers[best]


def validity_report(adapter: ModelAdapter | None, vector: torch.Tensor, pos: torch.Tensor | None,
                    neg: torch.Tensor | None, questions: Sequence[int], trait: Trait,
                    layer: int | None = None) -> ValidityReport:
    """All four checks for a vector `vector` [L, d] built from per-pair response averages `pos`/`neg` [P, L, d].

    Without an `adapter` the forward-pass checks (ladder, labels) are skipped; without per-pair activations the
    held-out and split-half checks are. `layer` fixes the judged layer; by default `choose_layer` picks it.
    """
    n_layers = vector.shape[0]
    notes: list[str] = []
    counts: dict[str, int] = {"pairs": 0 if pos is None else len(pos), "questions": len(set(questions))}
    if pos is not None and neg is not None and len(pos):
        held, stab = held_out_auroc(pos, neg, questions), split_half_cosine(pos, neg, questions)
        if len(set(questions)) < 2:
            notes.append("held-out and split-half checks need pairs from at least 2 questions")
    else:
        held, stab = [None] * n_layers, [None] * n_layers
        notes.append("held-out and split-half checks skipped: no per-pair activations")
    ladder = label_au = label_sp = None
    if adapter is not None:
        ladder, counts["ladder_prompts"] = ladder_spearman(adapter, vector, trait)
        label_au, label_sp, counts["labelled_answers"] = label_agreement(adapter, vector, trait.name)
        if ladder is None:
            notes.append(f"no system-prompt ladder for {trait.name!r}: prompt separation not measured")
        if label_au is None:
            notes.append(f"label AUROC not measured: the package has fewer than {MIN_CLASS} labelled real answers "
                         f"of {trait.name!r} that show the trait (or that do not)")
    report = ValidityReport(list(range(n_layers)), held, stab, ladder, label_au, label_sp, None, counts, notes)
    report.layer = choose_layer(report) if layer is None else layer
    return report
