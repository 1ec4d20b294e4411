"""Judges scoring answers 0-100 for a trait and for coherence (logprob, digits, API, probe), and their quality."""

from .api import make_judge
from .labelled import HELDOUT_FROM, load_real_set, load_written_set
from .local import (
    DEFAULT_COHERENCE_MODE,
    DEFAULT_TRAIT_MODE,
    TRAIT_MODES,
    Judge,
    JudgeRequest,
    LocalJudge,
    load_local_judge,
)
from .probe import ProbeFeatures, ProbeJudge, ProbeWeights, level_score, load_probe_judge, probe_weights_path
from .probe_fit import LabelledAnswer, fit_heads
from .quality import JudgeEvalResult, compare_modes, labelled_set, plot_reliability
from .scoring import ScoreCache, judge_answers

__all__ = [
    "DEFAULT_COHERENCE_MODE", "DEFAULT_TRAIT_MODE", "HELDOUT_FROM", "Judge", "JudgeEvalResult", "JudgeRequest",
    "LabelledAnswer", "LocalJudge", "ProbeFeatures", "ProbeJudge", "ProbeWeights", "ScoreCache", "TRAIT_MODES",
    "compare_modes", "fit_heads", "judge_answers", "labelled_set", "level_score", "load_local_judge",
    "load_probe_judge", "load_real_set", "load_written_set", "make_judge", "plot_reliability",
    "probe_weights_path",
]
