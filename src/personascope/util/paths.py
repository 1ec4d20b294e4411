"""Where the package's own data lives (traits, labelled sets, ready-made vectors, the dashboard)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """A path inside the installed package's `data/` folder (works from a checkout and from a wheel)."""
    return Path(str(resources.files("personascope").joinpath("data", *parts)))


def static_path(*parts: str) -> Path:
    """A path inside the installed package's `static/` folder (the dashboard's assets)."""
    return Path(str(resources.files("personascope").joinpath("static", *parts)))
