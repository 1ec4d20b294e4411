"""personascope: find, monitor and control character traits (persona vectors) in language models."""

__version__ = "0.1.0"
