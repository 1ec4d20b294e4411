"""CLI commands for screen."""

import typer


def register(app: typer.Typer) -> None:
    """Add the screen commands to the main app."""
