"""Evaluation of steering: trait and coherence over strengths and layers, and general capability."""

from .capability import load_mc, mc_accuracy
from .evaluate import (
    EVAL_PROFILES,
    MIN_FLUENT,
    Condition,
    EvalConfig,
    capability_per_row,
    choose_layer,
    choose_steering,
    condition_capability,
    condition_hooks,
    evaluate,
    guard_annotator,
    guard_conditions,
    passes_gate,
    sweep_conditions,
    sweep_rows,
    write_summary,
)

__all__ = [
    "Condition", "EVAL_PROFILES", "MIN_FLUENT", "EvalConfig", "capability_per_row", "choose_layer", "choose_steering",
    "condition_capability", "condition_hooks", "evaluate", "guard_annotator", "guard_conditions", "load_mc",
    "mc_accuracy", "passes_gate", "sweep_conditions", "sweep_rows", "write_summary",
]
