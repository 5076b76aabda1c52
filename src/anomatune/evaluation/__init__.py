"""Evaluation: the MVTec metrics (``metrics``), scoring a test split (``evaluate``), figures (``plots``)."""

from ..lazy import lazy_exports

_EXPORTS = {"evaluate": "evaluate", "score_dataset": "evaluate", "Evaluation": "evaluate", "evaluate_scores": "metrics"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
