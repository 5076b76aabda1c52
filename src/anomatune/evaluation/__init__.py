"""Evaluating a run on a labelled test split: metrics and figures written to ``evaluation/`` (``evaluate``, ``plots``)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .evaluate import evaluate

_EXPORTS = {"evaluate": "evaluate"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
