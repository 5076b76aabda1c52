"""anomatune: industrial visual anomaly detection with model-guided contrastive fine-tuning.

Layout follows the pipeline: ``data`` (images, masks, datasets) → ``backbones``
(pretrained networks by name) → ``features`` (differentiable patch features) →
``models`` (detectors) → ``finetune`` (the paper's method) → ``runs`` / ``metrics``
(fit, evaluate) → ``inference`` (predict), ``report``, ``deploy`` (export) → ``cli``.

The workflow functions are importable from the top level (loaded on first use, so
``import anomatune`` stays light): ``fit``, ``evaluate``, ``predict``, ``build_report``,
``export``; the fine-tuning is ``anomatune.finetune.finetune``.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from .errors import AnomatuneError

try:
    __version__ = version("anomatune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {"fit": "runs", "evaluate": "runs", "load_run": "runs", "predict": "inference", "build_report": "report", "export": "deploy"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'anomatune' has no attribute {name!r}")


__all__ = ["AnomatuneError", "__version__", *_LAZY]
