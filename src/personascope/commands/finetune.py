"""CLI commands for finetune."""

import typer


def register(app: typer.Typer) -> None:
    """Add the finetune commands to the main app."""
