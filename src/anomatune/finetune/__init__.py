"""Model-guided contrastive fine-tuning (Artola et al., CVPR 2024 Workshops).

``settings`` (torch-free) → ``negatives`` (colour-mapped natural crops, CutPaste) →
``loss`` (the mixture loss and the outlier filter) → ``validation`` (held-out good images
with synthetic defects, no test label) → ``loop`` (Adam on the backbone or on an adaptor,
online guiding model, checkpoints, the best one kept, the fallback) → ``diagnostics``
(gradient weights, feature norms, figures).
"""

from ..lazy import lazy_exports

_EXPORTS = {"FinetuneSettings": "settings", "Finetuner": "loop", "finetune": "loop", "dry_run": "loop"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
