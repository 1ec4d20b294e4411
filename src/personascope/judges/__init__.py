"""Judges scoring answers 0-100 for a trait and for coherence (logprob, digits, API, probe), and their quality."""

from .api import JudgeAPIError, make_judge
from .fluency import (
    FLUENCY_FEATURES,
    Fluency,
    FluencyModel,
    answer_nll,
    fluency_of,
    fluent_share,
    score_fluency,
    text_features,
)
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
    "answer_nll", "compare_modes", "DEFAULT_COHERENCE_MODE", "DEFAULT_TRAIT_MODE", "fit_heads", "Fluency",
    "FLUENCY_FEATURES", "fluency_of", "FluencyModel", "fluent_share", "HELDOUT_FROM", "Judge", "judge_answers",
    "JudgeAPIError", "JudgeEvalResult", "JudgeRequest", "labelled_set", "LabelledAnswer", "level_score",
    "load_local_judge",
    "load_probe_judge", "load_real_set", "load_written_set", "LocalJudge", "make_judge", "plot_reliability",
    "probe_weights_path", "ProbeFeatures", "ProbeJudge", "ProbeWeights", "score_fluency", "ScoreCache",
    "text_features", "TRAIT_MODES",
]
