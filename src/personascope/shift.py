"""Finetuning shift: how far finetuning moved the model along a persona vector.

shift[l] = mean over the trait's evaluation prompts of (a_ft[l] − a_base[l]) · v̂[l], with `a` the
residual stream at the last prompt token (the position that produces the first answer token).
Both models see the same rendered prompts (no system text beyond the chat template's default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activations import last_token_activations
from .adapter import ModelAdapter
from .traits import Trait
from .vectors import PersonaVector


@dataclass
class ShiftResult:
    """The shift at the chosen layer, at every layer 0..L, and per prompt at the chosen layer."""

    layer: int
    shift: float
    per_layer: list[float]
    per_prompt: list[float]
    n_prompts: int
    span: str = "prompt_last"


def eval_prompts(adapter: ModelAdapter, trait: Trait, n_questions: int | None = None) -> list[str]:
    qs = trait.eval_questions[:n_questions] if n_questions else trait.eval_questions
    if not qs:
        raise ValueError(f"trait {trait.name!r} has no evaluation questions")
    return [adapter.prompt(q) for q in qs]


def shift_from_activations(base: torch.Tensor, finetuned: torch.Tensor, vector: PersonaVector, layer: int,
                           span: str = "response_avg") -> ShiftResult:
    """The shift from precomputed [N, L + 1, d] activations (compute the base ones once for many finetunes)."""
    if base.shape != finetuned.shape:
        raise ValueError(f"activation shapes differ: base {tuple(base.shape)}, finetuned {tuple(finetuned.shape)}")
    v = vector.vectors[span].float()  # [L + 1, d]
    unit = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    proj = torch.einsum("nld,ld->nl", (finetuned - base).double(), unit.double())  # [N, L + 1]
    per_layer = proj.mean(0)
    return ShiftResult(layer, float(per_layer[layer]), [float(x) for x in per_layer],
                       [float(x) for x in proj[:, layer]], base.shape[0])


def finetuning_shift(
    base: ModelAdapter,
    finetuned: ModelAdapter,
    trait: Trait,
    vector: PersonaVector,
    layer: int | None = None,
    n_questions: int | None = None,
    batch_size: int = 8,
) -> ShiftResult:
    """Mean projection of (a_ft − a_base) on v̂ at the last prompt token of the trait's evaluation prompts."""
    vector.check(base)
    vector.check(finetuned)
    layer = base.check_layer(vector.default_layer(layer))
    prompts = eval_prompts(base, trait, n_questions)
    if eval_prompts(finetuned, trait, n_questions) != prompts:
        raise ValueError("the two models render the evaluation prompts differently (different chat templates)")
    a_base = last_token_activations(base, prompts, batch_size)
    a_ft = last_token_activations(finetuned, prompts, batch_size)
    return shift_from_activations(a_base, a_ft, vector, layer)
