"""The package version, in one place (pyproject reads it; the CLI and exports report it)."""

__version__ = "0.3.0"
