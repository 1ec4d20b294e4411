"""Finetuning shift: how far finetuning moved the model along a persona vector.

shift[l] = mean over the trait's evaluation prompts of (a_ft[l] − a_base[l]) · v̂[l], with `a` the
residual stream at the last prompt token (the position that produces the first answer token).
Both models see the same rendered prompts (no system text beyond the chat template's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from personascope.judges import Judge
from personascope.model import ModelAdapter, last_token_activations
from personascope.traits import Trait
from personascope.vectors import PersonaVector


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


@dataclass
class ShiftReport:
    """A finetune's shift along a vector, plus (when asked) judged trait/coherence and MC accuracy before and
    after; `summary` is what `shift.json` holds."""

    shift: ShiftResult
    run_dir: Path
    summary: dict
    eval_rows: list[dict] = field(default_factory=list)  # base, finetuned (when judged)
    capability: dict[str, float] | None = None  # base / finetuned accuracy (when measured)
    n_capability: int = 0


def run_shift(
    base: ModelAdapter,
    finetuned: ModelAdapter,
    trait: Trait,
    vector: PersonaVector,
    run_dir: str | Path,
    layer: int | None = None,
    n_questions: int | None = 8,
    judge: Judge | None = None,
    max_new_tokens: int | None = None,
    capability_rows: list[dict] | None = None,
    names: dict[str, str] | None = None,
) -> ShiftReport:
    """The shift at every layer, the judged evaluation of both models (with a judge) and their multiple-choice
    accuracy (with `capability_rows`); writes shift.json and shift.png under `run_dir`."""
    from personascope.evaluation import EVAL_PROFILES, Condition, evaluate, mc_accuracy
    from personascope.util import write_json

    run_dir = Path(run_dir)
    res = finetuning_shift(base, finetuned, trait, vector, layer, n_questions)
    summary: dict = {**(names or {}), "trait": trait.name, "layer": res.layer, "shift": res.shift,
                     "shift_per_layer": res.per_layer, "shift_per_prompt": res.per_prompt}
    report = ShiftReport(res, run_dir, summary)
    models = (("base", base), ("finetuned", finetuned))
    if judge is not None:
        cfg = replace(EVAL_PROFILES["quick"], n_questions=n_questions)
        if max_new_tokens:
            cfg = replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=max_new_tokens))
        for name, ad in models:
            row = evaluate(ad, trait, judge, [Condition(label=name)], run_dir / name, cfg=cfg)[0]
            report.eval_rows.append(row)
            summary[f"{name}_trait"] = row["trait_mean"]
            summary[f"{name}_coherence"] = row["coherence_mean"]
    if capability_rows is not None:
        report.capability = {name: mc_accuracy(ad, capability_rows).accuracy for name, ad in models}
        report.n_capability = len(capability_rows)
        summary.update({f"{name}_capability": acc for name, acc in report.capability.items()})
    label = Path(str(summary.get("finetuned", finetuned.name))).name
    plot_shift(res, run_dir / "shift.png", f"{trait.name}: finetuning shift ({label})")
    write_json(run_dir / "shift.json", summary)
    return report


def plot_shift(res: ShiftResult, path: Path, title: str) -> Path:
    """The shift per layer with the chosen layer marked."""
    import matplotlib.pyplot as plt

    from personascope.util import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(range(len(res.per_layer)), res.per_layer, marker="o", ms=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(res.layer, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("shift along v̂")
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
