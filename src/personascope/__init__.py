"""personascope: find, monitor and control character traits (persona vectors) in language models.

The face holds what a researcher needs first; everything else comes from its package
(`personascope.monitor.run_monitor`, `personascope.judges.LocalJudge`, ...).
"""

from ._version import __version__
from .judges import make_judge
from .model import load_model
from .monitor import trace_generation
from .screen import screen_dataset
from .steering import Guard, steer
from .traits import load_trait
from .vectors import PersonaVector, extract_vector, load_vector

__all__ = [
    "__version__", "load_model", "load_trait", "make_judge", "extract_vector", "load_vector", "PersonaVector",
    "steer", "Guard", "trace_generation", "screen_dataset",
]
