"""anomatune: industrial visual anomaly detection with model-guided contrastive fine-tuning.

Layout follows the pipeline: ``data`` (images, masks, datasets) → ``backbones``
(pretrained networks by name) → ``features`` (differentiable patch features).
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import AnomatuneError

try:
    __version__ = version("anomatune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["AnomatuneError", "__version__"]
