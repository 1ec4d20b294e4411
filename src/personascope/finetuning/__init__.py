"""Finetuning: LoRA training (with preventative steering), trait datasets, the activation shift along a vector, and
that shift tracked during training (PersonaShiftCallback)."""

from .callback import PersonaShiftCallback, watch_traits
from .datasets import LEVELS, DatasetConfig, chat_row, ended, make_dataset, make_mistakes_dataset, write_chat_jsonl
from .shift import eval_prompts, run_shift, shift_from_activations
from .telemetry import ShiftInputError, ShiftRule, parse_rule, plot_trajectory, read_trajectory
from .train import PreventativeSteering, adapter_applied, finetune, profile

__all__ = [
    "DatasetConfig", "LEVELS", "PersonaShiftCallback", "PreventativeSteering", "ShiftInputError", "ShiftRule",
    "adapter_applied", "chat_row", "ended", "eval_prompts", "finetune", "make_dataset", "make_mistakes_dataset",
    "parse_rule", "plot_trajectory", "profile", "read_trajectory", "run_shift", "shift_from_activations",
    "watch_traits", "write_chat_jsonl",
]
