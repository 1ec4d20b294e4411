"""Screening training data: the projection difference (ΔP) of dataset answers against the model's own."""

from .report import ScreenResult, bootstrap_ci
from .run import process_chunk, screen_dataset
from .score import METHODS, AnswerCache, BadRow, count_rows
from .types import PassResult, ScreenConfig

__all__ = [
    "AnswerCache", "BadRow", "METHODS", "PassResult", "ScreenConfig", "ScreenResult", "bootstrap_ci",
    "count_rows", "process_chunk", "screen_dataset",
]
