"""anomatune: industrial visual anomaly detection with model-guided contrastive fine-tuning.

The layers run one way (checked by ``make test``): ``data`` (images, masks, dataset layouts)
→ ``features`` (pretrained backbones, differentiable patch features) → ``models``
(detectors) → ``pipeline`` (features + detector + post-processing, scoring a split) →
``evaluation`` (metrics and figures written to a run), ``finetune`` (the paper's method)
and ``inference`` (predict, export, report) → ``serve`` (HTTP) and ``distributed`` (Ray)
→ ``apps`` (the command line, the jobs runner, the demo). Below them all: ``errors``,
``schema`` (settings as frozen dataclasses, torch-free), ``metrics``, ``folders`` (what
anomatune writes, atomically), ``device``, ``allocator``.

The main objects are importable from here (loaded on first use, so ``import anomatune``
stays light): ``Pipeline``, ``open_dataset``, ``evaluate``, ``predict``, ``export``,
``build_report`` and the settings classes; the fine-tuning is ``anomatune.finetune.finetune``.
"""

from typing import TYPE_CHECKING

from .errors import AnomatuneError
from .lazy import lazy_exports

__version__ = "0.3.0"  # the one place it is spelled: pyproject.toml reads it from here

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .data.layouts import open_dataset
    from .data.settings import DataSettings
    from .evaluation.evaluate import evaluate
    from .features.settings import FeatureSettings
    from .finetune.settings import FinetuneSettings
    from .folders.kinds import RunFolder
    from .inference.export import export
    from .inference.predict import predict
    from .inference.report import build_report
    from .pipeline.pipeline import Pipeline, Predictions
    from .pipeline.settings import PipelineSettings, RuntimeSettings

_EXPORTS = {
    "Pipeline": "pipeline.pipeline",
    "Predictions": "pipeline.pipeline",
    "RunFolder": "folders.kinds",
    "PipelineSettings": "pipeline.settings",
    "RuntimeSettings": "pipeline.settings",
    "DataSettings": "data.settings",
    "FeatureSettings": "features.settings",
    "FinetuneSettings": "finetune.settings",
    "open_dataset": "data.layouts",
    "evaluate": "evaluation.evaluate",
    "predict": "inference.predict",
    "build_report": "inference.report",
    "export": "inference.export",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["AnomatuneError", "__version__", *_EXPORTS]
