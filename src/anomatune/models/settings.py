"""Every detector's settings, and the registry of detector names (torch-free).

A detector is chosen by name (``gmm``, ``glad``, ``padim``, ``patchcore``); its settings
group is the dataclass registered under that name. In YAML a detector is
``{name: glad, n_components: 32, ...}``; on the command line ``--detector glad`` with
``--set n_components=8`` for its settings.

``normalize`` (ours, not in the papers): each grid position's scores are standardised by
the mean and standard deviation of the training patches' scores at that position, so a
position whose good patches always score high (an edge, a busy part of the object) stops
deciding the image score. Measured in ``benchmarks/results/settings.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import SettingsError
from ..schema import Settings, setting

DEFAULT_DETECTOR = "glad"
NORMALIZE_HELP = "Standardise scores per grid position by the training patches' scores there (ours; see 'Choosing a detector' in the documentation)."


@dataclass(frozen=True)
class DetectorSettings(Settings):
    """Base of the detectors' settings; the subclass registered under a name is chosen by it."""

    section = "detector"
    polymorphic = True
    name: ClassVar[str] = ""
    auto_proj_dim: ClassVar[int | None] = None  # feature dimension under --proj auto (None: keep them all)
    auto_aggregation: ClassVar[str] = "concat"  # the features' aggregation under --aggregation auto
    registry: ClassVar[dict[str, type[DetectorSettings]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            DetectorSettings.registry[cls.name] = cls

    @classmethod
    def names(cls) -> list[str]:
        return list(DetectorSettings.registry)

    def work(self, dim: int, positions: int, n_fit: int, n_scored: int) -> float:
        """Multiply-adds of a fit on ``n_fit`` images and of scoring ``n_scored`` more, with ``dim`` features at
        ``positions`` grid positions: the detector search plans its budget with it (a rough count, not a time)."""
        return float(positions * dim * dim * (n_fit + n_scored))

    @classmethod
    def resolve(cls, value: Any) -> type[DetectorSettings]:
        """The settings class of a detector name, a ``{name: ..., ...}`` mapping or an instance."""
        if isinstance(value, DetectorSettings):
            return type(value)
        name = value.get("name") if isinstance(value, Mapping) else value
        if name not in DetectorSettings.registry:
            raise ValueError(f"unknown detector {name!r}: use one of {', '.join(cls.names())}")
        return DetectorSettings.registry[name]

    @classmethod
    def coerce(cls, value: Any) -> DetectorSettings:
        kind = cls.resolve(value)
        if isinstance(value, DetectorSettings):
            return value
        if isinstance(value, Mapping):
            return super(DetectorSettings, kind).coerce({k: v for k, v in value.items() if k != "name"})
        return kind()

    @classmethod
    def missing_keys(cls, data: Any) -> list[str]:
        rest = {k: v for k, v in data.items() if k != "name"} if isinstance(data, Mapping) else data
        return super().missing_keys(rest)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **super().to_dict()}


@dataclass(frozen=True)
class GMMSettings(DetectorSettings):
    """Gaussian mixture on patch features (full covariances, EM from k-means++).

    Defaults measured on transistor and magnetic_tile (``benchmarks/results/settings.md``):
    K = 32, a ridge of 0.1 and 50k patches beat K = 16, a ridge of 1e-3 and 20k patches.
    """

    name = "gmm"
    # --proj auto gives mixtures PCA-64 features: fits 5-10x faster, same quality on the six development categories
    # (benchmarks/results/settings_glad.md)
    auto_proj_dim: ClassVar[int | None] = 64
    n_components: int = setting(32, "Mixture components K.", interval="[1, 100000]")
    ridge: float = setting(
        0.1, "Added to every covariance's diagonal, relative to the mean feature variance.", interval="(0, inf)"
    )
    max_iter: int = setting(30, "EM iterations at most.", interval="[1, 100000]")
    tol: float = setting(1e-2, "EM stops when the mean log-likelihood gains less than this.", interval="[0, inf)")
    max_patches: int = setting(
        50_000, "Random subsample of training patches that EM sees (bounds time and memory).", interval="[2, inf)"
    )
    seed: int = setting(0, "Seed of the subsample and the k-means++ start.")
    normalize: bool = setting(True, NORMALIZE_HELP)

    def work(self, dim: int, positions: int, n_fit: int, n_scored: int) -> float:
        em_patches = min(self.max_patches, n_fit * positions)  # E and M steps, then every patch's density once
        return float(self.n_components * dim * dim * (2 * em_patches * self.max_iter + (n_fit + n_scored) * positions))


@dataclass(frozen=True)
class GLADSettings(GMMSettings):
    """GLAD: the global mixture with per-position weights, floored (a tiny floor: log-densities
    spread over hundreds of nats, so a floor of 1e-3 left GLAD equal to the GMM)."""

    name = "glad"
    floor: float = setting(1e-12, "Smallest per-position component weight.", interval="(0, 1)")


@dataclass(frozen=True)
class PaDiMSettings(DetectorSettings):
    """PaDiM: one Gaussian per grid position (classic scores unless ``normalize``)."""

    name = "padim"
    ridge: float = setting(0.01, "Added to every covariance's diagonal (absolute, as in the PaDiM paper).", interval="(0, inf)")
    normalize: bool = setting(False, NORMALIZE_HELP)

    def work(self, dim: int, positions: int, n_fit: int, n_scored: int) -> float:
        return float(positions * dim * dim * (n_fit + n_scored + dim))  # the sums, one inverse per position, the scores


@dataclass(frozen=True)
class PatchCoreSettings(DetectorSettings):
    """PatchCore: nearest-neighbour distance to a greedy coreset (no ``normalize``: the bank
    holds the training patches, whose own scores are ~0)."""

    name = "patchcore"
    auto_aggregation = "stage"  # the paper's: anomalib's image AUROC on transistor (benchmarks/results/patchcore_parity.md)
    coreset_ratio: float = setting(0.1, "Share of training patches kept in the memory bank.", interval="(0, 1]")
    num_neighbors: int = setting(9, "Neighbourhood of the image score's reweighting (the paper's b).", interval="[1, 10000]")
    proj_dim: int = setting(128, "Random-projection dimension of the coreset selection distances.", interval="[1, 100000]")
    max_patches: int | None = setting(
        500_000,
        "Training patches the coreset is chosen from, at most: beyond it a seeded random "
        "sample, drawn while the features stream in (memory: max_patches x feature dim x 4 "
        "bytes; none = all). 500,000 keeps every patch of an MVTec AD category (at most "
        "~400 images x 1,024 patches at 256 px).",
        interval="[1, inf)",
    )
    seed: int = setting(0, "Seed of the projection, of the patch sample and of the first coreset patch.")

    def work(self, dim: int, positions: int, n_fit: int, n_scored: int) -> float:
        patches = n_fit * positions if self.max_patches is None else min(self.max_patches, n_fit * positions)
        bank = max(1.0, self.coreset_ratio * patches)  # the greedy selection, then every scored patch's search
        return float(patches * bank * self.proj_dim + n_scored * positions * bank * dim)


@dataclass(frozen=True)
class UpdateSettings(Settings):
    """How ``anomatune update`` moves a fitted detector to new good images without the old ones.

    PaDiM's update is exact (its running sums) and PatchCore's bank takes the new patches its
    streamed fit would sample; these settings are the mixtures' online EM (GMM, GLAD).
    """

    section = "update"
    em_steps: int = setting(5, "Online-EM steps over the new images' patches (GMM, GLAD).", interval="[1, 1000]")
    new_weight: float | None = setting(
        None,
        "Weight of the new images in the online EM (GMM, GLAD), in (0, 1]; default: their share of all the images "
        "the run has been fitted on.",
        interval="(0, 1]",
    )


def detector_settings(value: Any = DEFAULT_DETECTOR, **changes: Any) -> DetectorSettings:
    """A detector's settings from a name, a mapping or an instance, with ``changes`` applied."""
    try:
        settings = DetectorSettings.coerce(value)
    except SettingsError:
        raise
    except ValueError as exc:
        raise SettingsError(f"detector: {exc}") from None
    return settings.updated(**changes)
