"""Finetuning: LoRA training (with preventative steering), trait datasets, and the activation shift along a vector."""

from .datasets import LEVELS, DatasetConfig, chat_row, ended, make_dataset, make_mistakes_dataset, write_chat_jsonl
from .shift import eval_prompts, run_shift, shift_from_activations
from .train import PreventativeSteering, adapter_applied, finetune, profile

__all__ = [
    "DatasetConfig", "LEVELS", "PreventativeSteering", "adapter_applied", "chat_row", "ended", "eval_prompts",
    "finetune", "make_dataset", "make_mistakes_dataset", "profile", "run_shift", "shift_from_activations",
    "write_chat_jsonl",
]
