"""The pipeline's settings groups: post-processing, the decision threshold, the whole pipeline,
what fitting learnt beyond tensors, and how a command runs (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.settings import INPUT_SIDES, MAX_PIXELS, PILLOW_PIXELS, DataSettings
from ..device import parse_device
from ..errors import SettingsError
from ..features.settings import FeatureSettings
from ..models.settings import DEFAULT_DETECTOR, DetectorSettings, detector_settings
from ..schema import Settings, setting


@dataclass(frozen=True)
class PostprocessSettings(Settings):
    """How patch maps become pixel maps: upsampled (bilinear) to the input size, then smoothed."""

    section = "postprocess"
    sigma: float = setting(
        4.0,
        "Gaussian smoothing of the pixel maps, in pixels of the input size (0 = none; 4 is the MVTec protocol).",
        interval="[0, 100]",
    )
    standardize: bool = setting(
        False,
        "Standardise each pixel of the smoothed maps by the good images' out-of-fold maps there (their mean and "
        "standard deviation; learnt with the threshold's cross-fitting): a border, or a part of the product that "
        "varies, stops deciding the image score.",
    )


def _folds(value) -> int:
    folds = int(value)
    if folds == 1 or not 0 <= folds <= 100:
        raise ValueError(f"expected 0 (learn no threshold) or 2 to 100 folds, got {value!r}")
    return folds


@dataclass(frozen=True)
class ThresholdSettings(Settings):
    """How the decision threshold is learnt, from good images only: each good training image is scored by a model
    fitted without its fold (cross-fitting; the delivered model is fitted on every image), and the threshold is the
    score that the chosen share of good parts exceeds (see ``anomatune.calibration``)."""

    section = "threshold"
    flag_prefix = "threshold-"
    false_alarm_rate: float = setting(
        0.01,
        "Share of good parts that may be flagged defective: the threshold is the matching upper quantile of the good "
        "images' out-of-fold scores, with a tail model beyond the largest.",
        interval="(0, 0.5]",
        flag="false-alarm-rate",
    )
    folds: int = setting(
        5,
        "Cross-fitting folds of the good training images for GMM and GLAD (PaDiM and PatchCore leave each image out, "
        "exactly); 0 learns no threshold.",
        parse=_folds,
    )
    confidence: float = setting(
        0.5,
        "Where the rate lies in the tail model, the threshold is this upper bound of its quantile over a bootstrap "
        "of the tail fit (0.5: the estimate; higher: more cautious with few images).",
        interval="[0.5, 1)",
    )
    quantile: float | None = setting(
        None,
        "Override: the threshold is this quantile of the out-of-fold scores instead (none: from --false-alarm-rate).",
        interval="(0, 1]",
    )
    value: float | None = setting(
        None,
        "Override: this threshold on image scores, set by hand (none: from --false-alarm-rate); its false-alarm rate "
        "is still estimated from the out-of-fold scores.",
    )

    def rule(self, **changes: Any) -> ThresholdSettings:
        """These settings with a new rule for the threshold (flat keys, ``None`` = not given): the rate, quantile or
        value given replaces the others."""
        rules = ("false_alarm_rate", "threshold_quantile", "threshold_value")
        given = {k: v for k, v in changes.items() if v is not None}
        if sum(k in given for k in rules) > 1:
            raise SettingsError("give one of --false-alarm-rate, --threshold-quantile and --threshold-value")
        if not any(k in given for k in rules):
            raise SettingsError("give the new rule: --false-alarm-rate, --threshold-quantile or --threshold-value")
        return self.updated(**({"threshold_quantile": None, "threshold_value": None} | given))


@dataclass(frozen=True)
class PipelineSettings(Settings):
    """Everything that decides what a fitted pipeline computes; saved in the run's config.yaml."""

    features: FeatureSettings = setting(factory=FeatureSettings, help="How images become patch features.")
    detector: DetectorSettings = setting(
        factory=lambda: detector_settings(DEFAULT_DETECTOR),
        help=f"Detector: {', '.join(DetectorSettings.names())}; its settings with --set KEY=VALUE. 'anomatune fit' also "
        "takes auto, its default: the candidates (--search-*) scored on a validation set of synthetic anomalies "
        "(--validation-*), the best refit.",
        flag="detector",
        aliases=("model",),
    )
    postprocess: PostprocessSettings = setting(factory=PostprocessSettings, help="How patch maps become pixel maps and scores.")
    threshold: ThresholdSettings = setting(factory=ThresholdSettings, help="How the decision threshold is learnt.")
    seed: int = setting(
        0,
        "Seed of the random projection, of the cross-fitting folds and of the tail model's bootstrap (a detector's own "
        "seed: --set seed=N).",
    )


@dataclass(frozen=True)
class RuntimeSettings(Settings):
    """How a command runs: not saved with a run; never changes a result beyond float rounding, except that an image
    over ``max_pixels`` is refused rather than read."""

    section = "runtime"
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda, cuda:N or mps.", parse=parse_device)
    batch_size: int = setting(8, "Images per batch.", interval="[1, 4096]")
    max_pixels: int = setting(
        MAX_PIXELS,
        "Largest image accepted, in pixels (width x height): a larger one is refused from its header, before it is "
        "decoded (predict: a row with its error; serve: HTTP 413), so that one image cannot take the machine's memory.",
        interval=f"[64, {PILLOW_PIXELS}]",
    )


def _input_size(value) -> tuple[int, ...]:
    low, high = INPUT_SIDES
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and low <= v <= high for v in value):
        raise ValueError(f"expected [height, width] in pixels, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class FitRecord(Settings):
    """What fitting learnt besides the detector's tensors (``fitted`` in config.yaml)."""

    section = "fitted"
    input_size: tuple[int, ...] = setting(help="(height, width) every image is resized to.", parse=_input_size)
    weights_id: str = setting(help="Identifier of the backbone weights the run was fitted with.")
    layers: tuple[int, ...] = setting(help="The feature stages used.")
    threshold: float | None = setting(help="Decision threshold on the image score (none when none was learnt).")
    pixel_threshold: float | None = setting(help="Threshold on the pixel maps: a good image's mask is empty at the rate asked.")
    good_map_median: float | None = setting(help="Median pixel score of the good images, out of fold (the blue end of overlays).")
    calibration_images: int = setting(help="Good images scored out of fold to learn the threshold.", interval="[0, inf)")
    n_train: int = setting(help="Good images the detector was fitted on.", interval="[1, inf)")


@dataclass(frozen=True)
class RunConfig(Settings):
    """A run's config.yaml: the settings, the data it was fitted on, what fitting learnt."""

    anomatune_version: str = setting(help="The version that fitted the run.")
    run_format: int = setting(help="Version of the run folder's layout.")
    settings: PipelineSettings = setting(help="The pipeline's settings.")
    data: DataSettings | None = setting(help="The data the run was fitted on (none when fitted on a dataset built in Python).")
    fitted: FitRecord = setting(help="What fitting learnt.")
