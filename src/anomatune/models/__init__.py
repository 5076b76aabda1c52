"""Detectors on patch features: fit on good images, map where a new image is unlike them.

``create_detector(name_or_settings)`` builds one from the registry; the settings of every
detector are in ``models.settings`` (torch-free).
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "DetectorSettings": "settings", "GMMSettings": "settings", "GLADSettings": "settings", "PaDiMSettings": "settings",
    "PatchCoreSettings": "settings", "DEFAULT_DETECTOR": "settings", "detector_settings": "settings",
    "Detector": "base", "DensityModel": "base",
    "GMM": "gmm", "GLAD": "gmm", "PaDiM": "padim", "PatchCore": "patchcore",
    "DETECTORS": "registry", "create_detector": "registry",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
