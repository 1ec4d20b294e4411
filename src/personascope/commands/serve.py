"""CLI commands for serve."""

import typer


def register(app: typer.Typer) -> None:
    """Add the serve commands to the main app."""
