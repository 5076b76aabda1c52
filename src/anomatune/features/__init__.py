"""Patch features: pretrained backbones by name (``backbones``) and the differentiable extractor (``extractor``)."""

from ..lazy import lazy_exports

_EXPORTS = {
    "FeatureSettings": "settings",
    "FeatureExtractor": "extractor",
    "Backbone": "backbones", "create_backbone": "backbones", "list_backbones": "backbones", "register_backbone": "backbones",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
