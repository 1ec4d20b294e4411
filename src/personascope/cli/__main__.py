"""`python -m personascope.cli`: the command line."""

from .main import app

app()
