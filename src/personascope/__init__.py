"""personascope: find, monitor and control character traits (persona vectors) in language models."""

from ._version import __version__  # noqa: E402
from .activations import collect_spans, project  # noqa: E402
from .adapter import ModelAdapter  # noqa: E402
from .api_judge import make_judge  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .extract import extract_vector, filter_pairs, generate_answers, score_answers  # noqa: E402
from .finetune import finetune  # noqa: E402
from .guard import Guard  # noqa: E402
from .guard_calibrate import GuardCalibration, calibrate_guard  # noqa: E402
from .judge import LocalJudge, load_local_judge  # noqa: E402
from .models import load_model  # noqa: E402
from .monitor import project_prompts, trace_generation  # noqa: E402
from .monitor_run import run_monitor  # noqa: E402
from .screen_run import screen_dataset  # noqa: E402
from .steer import Steerer, steer  # noqa: E402
from .traits import Trait, load_trait  # noqa: E402
from .vectors import PersonaVector, load_vector  # noqa: E402

__all__ = [
    "__version__",
    "LocalJudge", "ModelAdapter", "PersonaVector", "Steerer", "Trait", "collect_spans", "extract_vector",
    "filter_pairs", "generate_answers", "load_local_judge", "load_model", "load_trait", "load_vector",
    "project", "project_prompts", "score_answers", "steer", "trace_generation", "make_judge", "evaluate",
    "finetune", "run_monitor", "screen_dataset", "Guard", "GuardCalibration", "calibrate_guard",
]
