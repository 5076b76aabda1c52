"""Every setting of the fine-tuning, with its default and why (torch-free, so ``--help`` is fast).

The features and the guiding detector are the pipeline's own settings groups with the
fine-tuning's defaults: the guide lives in a PCA-32 space of the frozen features, as a
16-component GMM. Defaults marked "measured" come from ``benchmarks/results/finetune.md``
(transistor and magnetic_tile).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..features.settings import FeatureSettings
from ..models.settings import DetectorSettings, GMMSettings
from ..schema import Settings, setting


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    section = "finetune"
    # the backbone, and the space and model of the guide
    features: FeatureSettings = setting(factory=lambda: FeatureSettings(proj_dim=32, proj="pca"),
                                        help="The backbone to fine-tune and the fixed projection the guide lives in (measured).")
    guide: DetectorSettings = setting(factory=lambda: GMMSettings(n_components=16, normalize=False),
                                      help="Guiding density model: gmm, glad or padim (a detector with log_density and "
                                           "online_update); its settings with --set KEY=VALUE. It takes --seed as its seed.",
                                      flag="guide", aliases=("model",))
    # the mixture loss (supplementary §2)
    alpha: float = setting(0.5, "Prior α of the negative (uniform) class.", interval="(0, 1)")
    calibration: str = setting("midpoint", "Where P(z=+|u) = 1/2: 'quantile' of the good log-densities (the paper) or 'midpoint' "
                                           "of the good and negative medians (ours; measured).", choices=("quantile", "midpoint"))
    boundary_quantile: float = setting(0.01, "Quantile of the good patches' log-density that sets log L (calibration=quantile).",
                                       interval="(0, 1)")
    temperature: float = setting(0.0, "Divides the log-density ratio in the posterior (ours; 1 = the paper) so negatives get "
                                      "gradient; 0 = auto: the gap between the good and negative median log-densities / 8 (measured).",
                                 interval="[0, inf)")
    decay: float = setting(0.99, "Online-model decay β of the sufficient statistics, per step.", interval="[0, 1)")
    filter: str = setting("threshold", "Outlier filter on negatives: fraction (the paper's: the lowest log-density share), "
                                       "threshold (P(z=+|u)<1/2; measured) or none.", choices=("fraction", "threshold", "none"))
    filter_fraction: float = setting(0.1, "Share of each batch's negative patches kept by filter=fraction.", interval="(0, 1]")
    # negatives
    negative_mode: str = setting("pasted", "Negatives: photos (whole colour-mapped natural images, the paper) or pasted "
                                           "(ours: pasted into good images; measured).", choices=("photos", "pasted"))
    paste_min: float = setting(0.1, "Smallest side of a pasted negative, as a share of the image side.", interval="(0, 1]")
    paste_max: float = setting(0.35, "Largest side of a pasted negative, as a share of the image side.", interval="(0, 1]")
    rho_min: float = setting(0.5, "Colour-transfer strength ρ ~ U[rho_min, 1] of the negatives.", interval="[0, 1]")
    crop_min: float = setting(0.25, "Smallest area share of a negative's random-resized crop.", interval="(0, 1]")
    color_method: str = setting("mk", "Colour transfer of the negatives: mk (Monge–Kantorovich) or diagonal.", choices=("mk", "diagonal"))
    # optimisation
    steps: int = setting(200, "Optimisation steps.", interval="[1, 10000000]")
    lr: float = setting(3e-5, "Adam learning rate.", interval="(0, 1]")
    batch_pos: int = setting(4, "Good images per step.", interval="[1, 4096]")
    batch_neg: int = setting(4, "Negative images per step.", interval="[1, 4096]")
    frozen_blocks: int = setting(0, "Leading backbone blocks (and the stem) kept frozen; 0 trains every block the features use.",
                                 interval="[0, 1000]")
    flip: str = setting("none", "Flips of the good images: none, h, v or hv (only where the product allows them).",
                        choices=("none", "h", "v", "hv"))
    clip_grad: float | None = setting(None, "Clip the gradient norm to this value (default: no clipping).", interval="(0, inf)")
    amp: bool = setting(True, "bfloat16 mixed precision for the backbone on CUDA (ignored on the CPU).")
    checkpoint_every: int = setting(50, "Write a checkpoint every this many steps (atomically).", interval="[1, 10000000]")
    diag_images: int = setting(16, "Good and negative images in the start/end diagnostics.", interval="[1, 10000]")
    seed: int = setting(0, "Seed of every random draw, the guide's included (a resumed run reproduces the same one).")

    def check(self) -> list[str]:
        if self.paste_min > self.paste_max:
            return [f"paste_min ({self.paste_min}) must not exceed paste_max ({self.paste_max})"]
        return []
