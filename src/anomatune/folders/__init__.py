"""The folders anomatune writes: one small class per kind, on one generic base.

``base``: atomic writes, a folder written as one set (staged, then swapped in), the lock
beside it, strict JSON; ``kinds``: a run (``anomatune fit``), its evaluation, a
fine-tuning and a set of predictions, each owning its file names. Nothing here knows what
the files mean: that stays with the layer that writes them.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .base import PNG_COMPRESSION, Folder, atomic_write, json_text
    from .feedback import FeedbackStore
    from .kinds import EvaluationFolder, FinetuneFolder, PredictionsFolder, RunFolder

_EXPORTS = {
    "Folder": "base",
    "atomic_write": "base",
    "json_text": "base",
    "PNG_COMPRESSION": "base",
    "FeedbackStore": "feedback",
    "RunFolder": "kinds",
    "EvaluationFolder": "kinds",
    "FinetuneFolder": "kinds",
    "PredictionsFolder": "kinds",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
