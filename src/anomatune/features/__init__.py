"""Patch features: pretrained backbones by name (``backbones``) and the differentiable extractor (``extractor``)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .backbones import Backbone, create_backbone, list_backbones, register_backbone
    from .extractor import FeatureExtractor
    from .settings import FeatureSettings


_EXPORTS = {
    "FeatureSettings": "settings",
    "FeatureExtractor": "extractor",
    "Backbone": "backbones",
    "create_backbone": "backbones",
    "list_backbones": "backbones",
    "register_backbone": "backbones",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
