"""Persona vectors: the file format, extraction (mean(pos) - mean(neg) per layer) and the validity checks."""

from .extract import PROFILES, answer_jobs, extract_vector, filter_pairs, profile, score_answers
from .file import (
    PersonaVector,
    VectorMismatchError,
    base_metadata,
    compute_dtype,
    find_packaged,
    load_vector,
    packaged_vectors,
)
from .validity import (
    THRESHOLDS,
    ValidityReport,
    choose_layer,
    held_out_auroc,
    label_curves,
    label_probe,
    ladder_curve,
    ladder_probe,
    split_half_cosine,
)

__all__ = [
    "PROFILES", "PersonaVector", "THRESHOLDS", "ValidityReport", "VectorMismatchError", "answer_jobs",
    "base_metadata", "choose_layer", "compute_dtype", "extract_vector", "filter_pairs", "find_packaged",
    "held_out_auroc",
    "label_curves", "label_probe", "ladder_curve", "ladder_probe", "load_vector", "packaged_vectors", "profile",
    "score_answers", "split_half_cosine",
]
