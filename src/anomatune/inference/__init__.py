"""Using a fitted run: scoring image files (``predict``), drawing what a person looks at,
exporting the model (``export``) and the HTML report (``report``)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .export import export
    from .predict import predict, score_paths
    from .report import build_report

_EXPORTS = {"predict": "predict", "score_paths": "predict", "export": "export", "build_report": "report"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
