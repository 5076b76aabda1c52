"""The pipeline (features + detector + post-processing), its settings and its run folders."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .pipeline import Pipeline, Predictions
    from .postprocess import PostProcessor
    from .settings import FitRecord, PipelineSettings, PostprocessSettings, RunConfig, RuntimeSettings, ThresholdSettings


_EXPORTS = {
    "PipelineSettings": "settings",
    "PostprocessSettings": "settings",
    "ThresholdSettings": "settings",
    "RuntimeSettings": "settings",
    "RunConfig": "settings",
    "FitRecord": "settings",
    "Pipeline": "pipeline",
    "Predictions": "pipeline",
    "PostProcessor": "postprocess",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
