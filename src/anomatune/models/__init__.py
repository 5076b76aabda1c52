"""Detectors on patch features: fit on good images, map where a new image is unlike them."""

from .base import Detector, gaussian_blur, postprocess
from .gmm import GLAD, GMM
from .padim import PaDiM
from .patchcore import PatchCore

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (GMM, GLAD, PaDiM, PatchCore)}


def create_detector(name: str, **settings) -> Detector:
    """A detector by name (``gmm``, ``glad``, ``padim``, ``patchcore``) with its settings."""
    from ..errors import AnomatuneError

    if name not in DETECTORS:
        raise AnomatuneError(f"unknown detector {name!r}: use one of {', '.join(DETECTORS)}")
    return DETECTORS[name](**settings)


__all__ = ["DETECTORS", "GLAD", "GMM", "Detector", "PaDiM", "PatchCore", "create_detector", "gaussian_blur", "postprocess"]
