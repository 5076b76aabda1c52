"""Model-guided contrastive fine-tuning (Artola et al., CVPR 2024 Workshops).

``settings`` (torch-free) → ``negatives`` (colour-mapped natural crops) → ``loss`` (the
mixture loss and the outlier filter) → ``loop`` (Adam, online guiding model,
checkpoints) → ``diagnostics`` (gradient weights, feature norms, figures).
"""

from .settings import FinetuneSettings


def __getattr__(name):  # the loop imports torch: load it only when used
    if name in ("finetune", "dry_run", "Finetuner"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)


__all__ = ["FinetuneSettings", "Finetuner", "dry_run", "finetune"]
