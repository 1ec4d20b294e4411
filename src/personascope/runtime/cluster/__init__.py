"""A Ray pool of model workers for generation, scoring, span sums and screening."""

from .pool import JudgeSpec, ModelSpec, RayCluster

__all__ = [
    "JudgeSpec", "ModelSpec", "RayCluster",
]
