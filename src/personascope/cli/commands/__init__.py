"""CLI command groups, one module per concept; each exposes `register(app)`."""
