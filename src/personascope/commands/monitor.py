"""CLI commands for monitor."""

import typer


def register(app: typer.Typer) -> None:
    """Add the monitor commands to the main app."""
