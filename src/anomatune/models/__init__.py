"""Detectors on patch features: fit on good images, map where a new image is unlike them.

``create_detector(name_or_settings)`` builds one from the registry; the settings of every
detector are in ``models.settings`` (torch-free).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .base import DensityModel, Detector
    from .gmm import GLAD, GMM
    from .padim import PaDiM
    from .patchcore import PatchCore
    from .registry import DETECTORS, create_detector
    from .settings import (
        DEFAULT_DETECTOR,
        DetectorSettings,
        GLADSettings,
        GMMSettings,
        PaDiMSettings,
        PatchCoreSettings,
        detector_settings,
    )


_EXPORTS = {
    "DetectorSettings": "settings",
    "GMMSettings": "settings",
    "GLADSettings": "settings",
    "PaDiMSettings": "settings",
    "PatchCoreSettings": "settings",
    "DEFAULT_DETECTOR": "settings",
    "detector_settings": "settings",
    "Detector": "base",
    "DensityModel": "base",
    "GMM": "gmm",
    "GLAD": "gmm",
    "PaDiM": "padim",
    "PatchCore": "patchcore",
    "DETECTORS": "registry",
    "create_detector": "registry",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
