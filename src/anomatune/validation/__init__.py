"""Choosing without labels: a validation set of synthetic anomalies from good images, scoring candidates on it,
and the detector search behind ``--detector auto``."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .scoring import validation_metrics
    from .search import CANDIDATES, Candidate, DetectorSearch
    from .sets import ValidationSet
    from .settings import ValidationSettings

_EXPORTS = {
    "ValidationSettings": "settings",
    "ValidationSet": "sets",
    "validation_metrics": "scoring",
    "Candidate": "search",
    "CANDIDATES": "search",
    "DetectorSearch": "search",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
