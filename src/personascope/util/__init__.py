"""Shared primitives with no knowledge of the method: seeds, statistics, run folders and JSONL, plots, package data."""

from .paths import data_path
from .plots import plot_extraction, plot_scatter, plot_sweep, plot_validity, save_figure
from .progress import LogProgress, ProgressTracker, progress_bar, set_progress_factory
from .rng import seeded
from .stats import auroc, bootstrap_ci, format_ci, pearson_r, spearman
from .store import JsonLine, JsonlStore, bind_run, dump_json, fingerprint, iter_json_lines, read_jsonl, write_json

__all__ = [
    "JsonLine", "JsonlStore", "LogProgress", "dump_json", "iter_json_lines",
    "ProgressTracker", "auroc", "bind_run", "bootstrap_ci", "data_path",
    "fingerprint", "format_ci", "pearson_r", "plot_extraction", "plot_scatter", "plot_sweep", "plot_validity",
    "progress_bar", "read_jsonl", "save_figure", "seeded", "set_progress_factory", "spearman", "write_json",
]
