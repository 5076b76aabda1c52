"""The detector classes by name, and a factory (a detector's settings name its class)."""

from __future__ import annotations

from typing import Any

from .base import Detector
from .gmm import GLAD, GMM
from .padim import PaDiM
from .patchcore import PatchCore
from .settings import DetectorSettings, detector_settings

DETECTORS: dict[str, type[Detector]] = {cls.Settings.name: cls for cls in (GMM, GLAD, PaDiM, PatchCore)}


def create_detector(settings: DetectorSettings | str | dict[str, Any], **changes: Any) -> Detector:
    """A detector from its settings, a name (``gmm``, ``glad``, ``padim``, ``patchcore``) or a mapping."""
    settings = detector_settings(settings, **changes)
    return DETECTORS[settings.name](settings)
