"""Optional dependencies, installed as pyproject.toml extras (`pip install 'memlm[ray]'`).
Code that needs one calls `require_extra` before importing it, so that a user without it
reads which extra to install instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "ray": ("ray",),  # `memlm serve --ray`: the model's layers in Ray actors
    "lance": ("lancedb", "pyarrow"),  # lance:// stores
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require_extra(extra: str, needed_by: str) -> None:
    """Raise MissingExtra unless every package of `extra` is installed."""
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(
            f"{needed_by} needs the {extra} extra ({', '.join(missing)} not installed): pip install 'memlm[{extra}]'"
        )
