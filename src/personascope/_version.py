"""The package version, in one place (vector files record it)."""

__version__ = "0.1.0"
