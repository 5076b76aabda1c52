"""How images become patch features: the backbone, its stages, the input size, pooling, projection (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.settings import DEFAULT_IMAGE_SIZE, parse_image_size
from ..schema import Settings, setting

AUTO = "auto"  # as projection: the detector's choice (PCA for the mixtures, none for PaDiM and PatchCore)
NONE = "none"  # as projection: keep every feature
PROJECTIONS = (AUTO, NONE, "random", "pca")
STAGE, CONCAT = "stage", "concat"
AGGREGATIONS = (AUTO, STAGE, CONCAT)
NORMALIZATIONS = ("backbone", "imagenet")
RANDOM = "random"  # as backbone weights: random weights drawn from a fixed seed


@dataclass(frozen=True)
class FeatureSettings(Settings):
    """The feature extractor's settings, saved with every run."""

    section = "features"
    backbone: str = setting("efficientnet_lite0", "Backbone: a packaged name (see 'anomatune backbones') or a timm name.")
    backbone_weights: str | None = setting(
        None,
        "Weights file (safetensors or a state_dict), an 'anomatune finetune' run folder, "
        "or 'random' (drawn from a fixed seed); default: the backbone's packaged weights.",
        metavar="PATH",
    )
    layers: tuple[int, ...] | None = setting(
        None,
        "Feature stages, comma-separated (timm's indices); default: the backbone's "
        "(2,3 for EfficientNet-Lite: strides 8 and 16).",
    )
    image_size: str = setting(
        DEFAULT_IMAGE_SIZE,
        "Input size: the short side in pixels (the long side follows the training "
        "images' median aspect ratio), or WxH exactly, e.g. 320x256.",
        metavar="SIZE",
        parse=parse_image_size,
    )
    normalization: str = setting(
        "backbone",
        "Input normalisation: the backbone's own statistics, or imagenet (anomalib's, whatever the weights were "
        "trained with; mean = std = 0.5 for EfficientNet-Lite).",
        choices=NORMALIZATIONS,
    )
    pool: int = setting(3, "Side of the average-pooling neighbourhood of patch features (odd; 1 = none).", interval="[1, 31]")
    aggregation: str = setting(
        AUTO,
        "Where the patch features are averaged: stage (each stage at its own resolution, zeros beyond the border "
        "counted, then upsampled and concatenated: the PatchCore paper's and anomalib's), concat (the stages "
        "concatenated first, then averaged over what lies inside the image), or auto: the detector's choice "
        "(stage for patchcore, concat for the others).",
        choices=AGGREGATIONS,
    )
    proj_dim: int | None = setting(
        None,
        "Project features to this many dimensions (none: keep all, or with --proj auto the "
        "detector's choice: 64 for gmm and glad, all for padim and patchcore).",
        interval="[1, 100000]",
    )
    proj: str = setting(
        AUTO,
        "Projection kind: none (every feature), pca (fitted on the good images), random (seeded), or auto: PCA, to "
        "the detector's dimension unless --proj-dim is given, and none when that is not below the features'.",
        choices=PROJECTIONS,
    )

    def check(self) -> list[str]:
        problems = [f"pool must be odd, not {self.pool}"] if self.pool % 2 == 0 else []
        if self.proj == NONE and self.proj_dim is not None:
            problems.append(f"--proj none keeps every feature: drop --proj-dim {self.proj_dim} or choose pca or random")
        return problems
