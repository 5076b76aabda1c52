"""Model-guided contrastive fine-tuning (Artola et al., CVPR 2024 Workshops).

``settings`` (torch-free) → ``negatives`` (colour-mapped natural crops, CutPaste) →
``loss`` (the mixture loss and the outlier filter) → ``validation`` (held-out good images
with synthetic defects, no test label) → ``strategies`` (what each mode trains: an
adaptor on cached features, or the backbone under torchrun, ``ddp``) → ``state`` (what a
checkpoint holds) → ``loop`` (the steps, the online guiding model, the best checkpoint
kept, the fallback) → ``outputs`` (the one writer of the folder) → ``diagnostics``
(gradient weights, feature norms, figures).
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .loop import Finetuner, dry_run, finetune
    from .settings import FinetuneSettings

_EXPORTS = {"FinetuneSettings": "settings", "Finetuner": "loop", "finetune": "loop", "dry_run": "loop"}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
