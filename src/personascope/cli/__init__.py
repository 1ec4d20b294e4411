"""The `personascope` command line: a thin layer over the packages (`cli.main` assembles the typer app)."""

from .demo import run_demo
from .main import app

__all__ = ["app", "run_demo"]
