"""The pipeline (features + detector + post-processing), its settings and its run folders."""

from ..lazy import lazy_exports

_EXPORTS = {
    "PipelineSettings": "settings", "PostprocessSettings": "settings", "ThresholdSettings": "settings",
    "RuntimeSettings": "settings", "RunConfig": "settings", "FitRecord": "settings",
    "Pipeline": "pipeline", "Predictions": "pipeline",
    "PostProcessor": "postprocess",
    "RunFolder": "folders",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
