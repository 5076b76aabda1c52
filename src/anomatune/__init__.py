"""anomatune: industrial visual anomaly detection with model-guided contrastive fine-tuning.

The layout follows the flow: ``data`` (images, masks, dataset layouts) → ``features``
(pretrained backbones, differentiable patch features) → ``models`` (detectors) →
``pipeline`` (features + detector + post-processing, run folders) → ``evaluation``
(metrics, figures) → ``finetune`` (the paper's method) → ``apps`` (command line,
prediction, report, export, demo). Settings live in frozen dataclasses beside each
concern (``*.settings``, torch-free); ``schema`` turns them into YAML and options.

The main objects are importable from here (loaded on first use, so ``import anomatune``
stays light): ``Pipeline``, ``open_dataset``, ``evaluate``, ``predict``, ``export``,
``build_report`` and the settings classes; the fine-tuning is ``anomatune.finetune.finetune``.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import AnomatuneError
from .lazy import lazy_exports

try:
    __version__ = version("anomatune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Pipeline": "pipeline.pipeline", "Predictions": "pipeline.pipeline", "RunFolder": "pipeline.folders",
    "PipelineSettings": "pipeline.settings", "RuntimeSettings": "pipeline.settings",
    "DataSettings": "data.settings", "FeatureSettings": "features.settings", "FinetuneSettings": "finetune.settings",
    "open_dataset": "data.layouts",
    "evaluate": "evaluation.evaluate",
    "predict": "apps.predict", "build_report": "apps.report", "export": "apps.export",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["AnomatuneError", "__version__", *_EXPORTS]
