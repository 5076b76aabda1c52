"""Every setting of the fine-tuning, with its default and why (torch-free, so ``--help`` is fast).

The features and the guiding detector are the pipeline's own settings groups with the
fine-tuning's defaults: the guide lives in a PCA-32 space of the frozen features, as a
16-component GMM. Defaults marked "measured" come from ``benchmarks/results/finetune.md``
(transistor and magnetic_tile).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..features.settings import FeatureSettings
from ..models.settings import DEFAULT_DETECTOR, DetectorSettings, GMMSettings
from ..schema import Settings, setting
from ..validation.settings import parse_families

MODES = ("backbone", "adaptor")
IMAGE_NEGATIVES = ("photos", "pasted", "cutpaste", "synthetic")
NEGATIVES = IMAGE_NEGATIVES + ("noise",)


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    section = "finetune"
    mode: str = setting(
        "adaptor",
        "What trains: backbone (the paper: the backbone's weights) or adaptor (ours: a small "
        "residual MLP on the frozen patch features, trained on features computed once).",
        choices=MODES,
    )
    adaptor_width: int = setting(64, "Hidden units of the adaptor's residual MLP (mode=adaptor).", interval="[1, 100000]")
    # the backbone, and the space and model of the guide
    features: FeatureSettings = setting(
        factory=lambda: FeatureSettings(proj_dim=32, proj="pca"),
        help="The backbone to fine-tune and the fixed projection the guide lives in (measured).",
    )
    guide: DetectorSettings = setting(
        factory=lambda: GMMSettings(n_components=16, normalize=False),
        help="Guiding density model: gmm, glad, padim or patchcore (a soft k-NN density on its bank; "
        "--set coreset_ratio=0.01 keeps it fast), so that the loss pulls towards what your detector "
        "measures; its settings with --set KEY=VALUE. It takes --seed as its seed.",
        flag="guide",
        aliases=("model",),
    )
    # the mixture loss (supplementary §2)
    alpha: float = setting(0.5, "Prior α of the negative (uniform) class.", interval="(0, 1)")
    calibration: str = setting(
        "midpoint",
        "Where P(z=+|u) = 1/2: 'quantile' of the good log-densities (the paper) or 'midpoint' "
        "of the good and negative medians (ours; measured).",
        choices=("quantile", "midpoint"),
    )
    boundary_quantile: float = setting(
        0.01, "Quantile of the good patches' log-density that sets log L (calibration=quantile).", interval="(0, 1)"
    )
    temperature: float = setting(
        0.0,
        "Divides the log-density ratio in the posterior (ours; 1 = the paper) so negatives get "
        "gradient; 0 = auto: the gap between the good and negative median log-densities / 8 (measured).",
        interval="[0, inf)",
    )
    decay: float = setting(0.99, "Online-model decay β of the sufficient statistics, per step.", interval="[0, 1)")
    filter: str = setting(
        "threshold",
        "Outlier filter on negatives: fraction (the paper's: the lowest log-density share), "
        "threshold (P(z=+|u)<1/2; measured) or none.",
        choices=("fraction", "threshold", "none"),
    )
    filter_fraction: float = setting(0.1, "Share of each batch's negative patches kept by filter=fraction.", interval="(0, 1]")
    # negatives
    negative_mode: str = setting(
        "synthetic",
        "Negatives, one kind or several joined by '+': photos (whole colour-mapped natural "
        "images, the paper), pasted (ours: pasted into good images), cutpaste (ours: boxes of "
        "the product's own images), synthetic (ours: near negatives, the validation's anomaly "
        "families drawn from the fine-tuning's own seeds and photos) or noise (ours: good features "
        "moved along the guide space's low-variance directions).",
        metavar="KINDS",
    )
    negative_families: tuple[str, ...] | None = setting(
        None,
        "Anomaly families of the synthetic negatives, comma-separated; default: the validation's "
        "(--validation-families). Families the validation does not use make its gain a gain on "
        "defects the training never made.",
        parse=parse_families,
    )
    curriculum: float = setting(
        0.5,
        "Share of the steps over which the synthetic negatives go from obvious to subtle: the lowest severity "
        "falls from 1 to 0 over it (0: every severity from the first step).",
        interval="[0, 1]",
    )
    context_positives: bool = setting(
        True,
        "The patches of a negative image that no changed pixel touches count as good (in L_pos): the contrast "
        "then sits where the anomaly is, not between two images (ours).",
    )
    noise_scale: float = setting(
        1.0, "Size of the noise negatives, in standard deviations of the guide space's features.", interval="(0, inf)"
    )
    paste_min: float = setting(0.1, "Smallest side of a pasted negative, as a share of the image side.", interval="(0, 1]")
    paste_max: float = setting(0.35, "Largest side of a pasted negative, as a share of the image side.", interval="(0, 1]")
    rho_min: float = setting(0.5, "Colour-transfer strength ρ ~ U[rho_min, 1] of the negatives.", interval="[0, 1]")
    crop_min: float = setting(0.25, "Smallest area share of a negative's random-resized crop.", interval="(0, 1]")
    color_method: str = setting(
        "mk", "Colour transfer of the negatives: mk (Monge–Kantorovich) or diagonal.", choices=("mk", "diagonal")
    )
    # optimisation
    steps: int = setting(200, "Optimisation steps.", interval="[1, 10000000]")
    lr: float | None = setting(
        None, "Adam learning rate; default: 1e-3 for the adaptor, 3e-5 for the backbone.", interval="(0, 1]"
    )
    batch_pos: int = setting(4, "Good images per step.", interval="[1, 4096]")
    batch_neg: int = setting(4, "Negative images per step.", interval="[1, 4096]")
    trust: float = setting(
        0.0,
        "Trust region (ours): weight of the mean squared distance of the good features to the frozen "
        "ones, over their variance (0: none).",
        interval="[0, inf)",
    )
    frozen_blocks: int = setting(
        0, "Leading backbone blocks (and the stem) kept frozen; 0 trains every block the features use.", interval="[0, 1000]"
    )
    flip: str = setting(
        "none",
        "Flips of the good images: none, h, v or hv (only where the product allows them).",
        choices=("none", "h", "v", "hv"),
    )
    clip_grad: float | None = setting(None, "Clip the gradient norm to this value (default: no clipping).", interval="(0, inf)")
    amp: bool = setting(True, "bfloat16 mixed precision for the backbone on CUDA (ignored on the CPU).")
    max_minutes: float | None = setting(
        None,
        "Stop once this many minutes of this session have passed (setup and validations counted), early enough for "
        "the last validation and the outputs: the step reached is validated and kept if it wins. For a fine-tuning "
        "that must fit a slot (default: run every step).",
        interval="(0, inf)",
    )
    checkpoint_every: int = setting(
        50, "Validate and write a checkpoint every this many steps (atomically).", interval="[1, 10000000]"
    )
    # validation without test labels (ours)
    validation_share: float = setting(
        0.2,
        "Share of the good training images held out (seeded) to validate each checkpoint; "
        "0: no validation, the last step is kept.",
        interval="[0, 0.9]",
    )
    validator: str = setting(
        DEFAULT_DETECTOR,
        "Detector refit on the current features at each checkpoint to score the validation set: the one you will "
        "fit on the fine-tuned backbone (after 'fit --detector auto', its pick).",
        choices=tuple(DetectorSettings.names()),
    )
    validation_fit_images: int = setting(64, "Training images the validator is fitted on.", interval="[2, 100000]")
    min_gain: float = setting(
        0.001,
        "A checkpoint must beat the frozen features' validation score by more than this to be "
        "kept (a guard against noise, set a priori, not tuned).",
        interval="[0, 1]",
    )
    diag_images: int = setting(16, "Good and negative images in the start/end diagnostics.", interval="[1, 10000]")
    seed: int = setting(0, "Seed of every random draw, the guide's included (a resumed run reproduces the same one).")

    @property
    def negative_kinds(self) -> list[str]:
        return self.negative_mode.split("+")

    def severity_floor(self, step: int) -> float:
        """The lowest severity of the synthetic negatives at ``step`` (the curriculum)."""
        if not self.curriculum:
            return 0.0
        return max(0.0, 1.0 - step / (self.curriculum * self.steps))

    def check(self) -> list[str]:
        problems = []
        if self.paste_min > self.paste_max:
            problems.append(f"paste_min ({self.paste_min}) must not exceed paste_max ({self.paste_max})")
        unknown = [kind for kind in self.negative_kinds if kind not in NEGATIVES]
        if unknown or len(set(self.negative_kinds)) < len(self.negative_kinds):
            problems.append(f"negative_mode {self.negative_mode!r}: use one or more of {', '.join(NEGATIVES)}, joined by '+'")
        elif not set(self.negative_kinds) & set(IMAGE_NEGATIVES):
            problems.append("negative_mode noise needs an image kind beside it, e.g. pasted+noise")
        elif self.batch_neg < len(self.negative_kinds):
            problems.append(f"batch_neg ({self.batch_neg}) must be at least the number of negative kinds ({self.negative_mode})")
        if self.mode == "adaptor" and self.frozen_blocks:
            problems.append("frozen_blocks applies to mode=backbone; the adaptor mode trains no backbone block")
        return problems
