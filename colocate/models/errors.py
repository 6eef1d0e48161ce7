"""The model-refusal error, in a module of its own so that checks made before anything starts (`preflight`)
can name it without importing torch."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """This model cannot be refit exactly (its architecture, or a layout the framework cannot stream)."""
