"""What every detector shares: fitting on patch features, anomaly maps, fitted state, saving.

A detector sees patch features ``(N, D, h, w)``. ``anomaly_map`` gives a patch-level map
``(B, h, w)`` (higher = more anomalous); ``detect`` adds image scores where a detector has
its own (PatchCore). Turning maps into pixel maps and image scores is the pipeline's
post-processing: one path for every detector.

Settings live in a frozen dataclass (``detector.settings``, see ``models.settings``);
fitted parameters are attributes with a trailing underscore (scikit-learn's convention:
``means_``, ``grid_``), saved by ``state_dict`` as tensors (safetensors, never pickled).
Density models (GMM, GLAD, PaDiM, and PatchCore by a soft k-NN density) also follow :class:`DensityModel`: what the
fine-tuning needs of its guide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol, runtime_checkable

import torch

from ..errors import AnomatuneError, check_is_fitted
from .settings import DetectorSettings, UpdateSettings

CHUNK = 8192  # patches per step of the per-patch computations: bounds their memory


def in_chunks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None, size: int = CHUNK) -> torch.Tensor:
    """``fn`` over aligned row chunks of ``tensors`` (``None`` passes through), concatenated.

    While traced for export, one piece: a traced loop would freeze the exported batch size."""
    if torch.jit.is_tracing():
        return fn(*tensors)
    n = len(tensors[0])
    return torch.cat([fn(*(None if t is None else t[i : i + size] for t in tensors)) for i in range(0, n, size)])


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """``(N, D, h, w)`` → ``(N*h*w, D)``, patches of one image contiguous."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


@runtime_checkable
class DensityModel(Protocol):
    """A detector that can guide the fine-tuning: a differentiable log-density that follows moving features.

    ``positions`` are flat grid indices (``y * w + x``), one per patch; global models ignore them.
    """

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log p(u) of patches ``u`` (N, D), differentiable in ``u``."""

    def online_update(self, u: torch.Tensor, positions: torch.Tensor | None, decay: float) -> None:
        """Follow the detached patches ``u``: statistics decay by ``decay`` and take the batch's share ``1 − decay``."""


class Detector:
    """Base class: subclasses set ``Settings`` and ``state`` and implement ``_fit`` and ``_patch_scores``.

    ``Detector(settings)`` or ``Detector(**changes)`` (e.g. ``GMM(n_components=8)``).
    """

    Settings: ClassVar[type[DetectorSettings]]
    state: ClassVar[tuple[str, ...]] = ()  # names of the fitted tensors besides grid and n_features
    online_state: ClassVar[tuple[str, ...]] = ()  # statistics of online_update, saved when present
    derived: ClassVar[tuple[str, ...]] = ()  # fitted tensors recomputed from the state at load (:meth:`_derive`), not saved
    fitted_attribute: ClassVar[str] = "grid_"  # set once a fit succeeded (see errors.check_is_fitted)

    def __init__(self, settings: DetectorSettings | None = None, **changes):
        settings = self.Settings() if settings is None else settings
        if type(settings) is not self.Settings:
            raise AnomatuneError(f"{type(self).__name__} takes {self.Settings.__name__}, not {type(settings).__name__}")
        self.settings = settings.updated(**changes)

    @property
    def name(self) -> str:
        return self.Settings.name

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # -- fitted state ----------------------------------------------------------------------

    @property
    def normalized(self) -> bool:
        return bool(getattr(self.settings, "normalize", False))

    def state_names(self) -> tuple[str, ...]:
        """The fitted tensors every fitted detector of these settings has."""
        return ("grid", "n_features") + self.state + (("score_mean", "score_std") if self.normalized else ())

    def check_is_fitted(self) -> None:
        check_is_fitted(self, "call fit(train_features) first")

    def _fitted_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and isinstance(v, torch.Tensor)}

    def _reset(self) -> None:
        for name in self._fitted_tensors():
            delattr(self, name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors by name (without the trailing underscore), on the CPU."""
        self.check_is_fitted()
        tensors = self._fitted_tensors().items()
        return {k[:-1]: v.detach().cpu().contiguous() for k, v in tensors if k[:-1] not in self.derived}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "the detector state") -> Detector:
        """Set the fitted tensors, refusing a state written for another detector or other settings."""
        required, allowed = set(self.state_names()), set(self.state_names()) | set(self.online_state)
        missing, unknown = sorted(required - set(state)), sorted(set(state) - allowed)
        if missing or unknown:
            what = "; ".join(
                p
                for p in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(unknown)}" if unknown else "",
                )
                if p
            )
            raise AnomatuneError(f"{source} does not fit a {self.name} detector with these settings ({what}): refit the run")
        self._reset()
        for key, value in state.items():
            setattr(self, key + "_", value)
        self._derive()
        return self

    def _derive(self) -> None:
        """Recompute the ``derived`` tensors from the loaded state (a subclass that has some)."""

    def to(self, device: torch.device | str) -> Detector:
        for key, value in self._fitted_tensors().items():
            setattr(self, key, value.to(device))
        return self

    # -- checks --------------------------------------------------------------------------

    @staticmethod
    def _check_features(features: torch.Tensor) -> None:
        if features.dim() != 4:
            raise AnomatuneError(f"expected patch features (N, D, h, w), got shape {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise AnomatuneError("patch features contain NaN or infinite values: check the input images and the backbone weights")

    def _check_input(self, features: torch.Tensor) -> None:
        """Fitted, and features of the fit's dimension: another dimension means other layers or projection."""
        self.check_is_fitted()
        self._check_features(features)
        if features.shape[1] != int(self.n_features_):
            raise AnomatuneError(
                f"{self.name} was fitted on {int(self.n_features_)}-d patch features, got {features.shape[1]}-d: "
                "the feature layers or projection differ from the fit's"
            )

    def _check_grid(self, features: torch.Tensor) -> None:
        """Per-position models only score the grid they were fitted on."""
        grid = tuple(self.grid_.tolist())
        if tuple(features.shape[-2:]) != grid:
            raise AnomatuneError(
                f"{self.name} was fitted on a {grid[0]}x{grid[1]} grid, got {features.shape[-2]}x{features.shape[-1]}: use the same input size"
            )

    # -- fitting and scoring -------------------------------------------------------------

    def _fit(self, features: torch.Tensor, **options) -> torch.Tensor | None:
        """Learn from ``features``; may return their raw patch scores when it computed them on the way (GLAD), which
        spares the normalisation a second pass over every training patch."""
        raise NotImplementedError

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, features: torch.Tensor, **options) -> Detector:
        """Fit on good patch features ``(N, D, h, w)`` (``options``: a detector's own, e.g. the mixtures' warm start)."""
        self._check_features(features)
        self._reset()
        scores = self._fit(features, **options)
        self._record_shape(features)
        if self.normalized:
            scores = self._raw_scores(features) if scores is None else scores.double()
            self.score_mean_ = scores.mean(0)
            self.score_std_ = scores.std(0).clamp_min(1e-6 * float(scores.std()) + 1e-12)
        return self

    @torch.no_grad()
    def _raw_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Patch scores of good features before the normalisation (float64): what ``normalize`` learns from."""
        return torch.cat([self._patch_scores(chunk) for chunk in torch.split(features, 16)]).double()

    def _record_shape(self, features: torch.Tensor) -> None:
        """The grid and feature dimension fitted on: what scoring checks its inputs against."""
        self.grid_ = torch.tensor(features.shape[-2:])
        self.n_features_ = torch.tensor(features.shape[1])

    def fit_batches(self, batches: Iterable[torch.Tensor], n_images: int) -> Detector:
        """Fit on features that arrive batch by batch, ``n_images`` in all. This default gathers
        them, so memory grows with the training set; PaDiM keeps running sums and PatchCore a
        bounded sample instead."""
        return self.fit(torch.cat(list(batches)))

    def _partial_fit(self, features: torch.Tensor, n_before: int, settings: UpdateSettings) -> torch.Tensor | None:
        """Learn from more images; like :meth:`_fit`, may return their raw patch scores under the updated model."""
        raise AnomatuneError(f"{self.name} cannot be updated with new images: refit it on all of them")

    def partial_fit(self, features: torch.Tensor, n_before: int, settings: UpdateSettings | None = None) -> Detector:
        """Learn from more good patch features ``(N, D, h, w)`` without the ``n_before`` images fitted on
        (scikit-learn's ``partial_fit``): exact for PaDiM, a sample merge for PatchCore, online EM for the mixtures.

        With ``normalize``, the per-position score statistics pool the fit's with the new images' scores
        (the old images are not scored again: their statistics are the old model's)."""
        self._check_input(features)
        scores = self._partial_fit(features, n_before, settings or UpdateSettings())
        if self.normalized:
            self._check_grid(features)
            scores = self._raw_scores(features) if scores is None else scores.double()
            n_a, n_b = float(n_before), float(len(scores))
            mean_a, var_a = self.score_mean_.double(), self.score_std_.double() ** 2
            mean_b, var_b = scores.mean(0), scores.var(0) if n_b > 1 else torch.zeros_like(mean_a)
            n = n_a + n_b
            mean = (n_a * mean_a + n_b * mean_b) / n
            var = ((n_a - 1) * var_a + (n_b - 1) * var_b + n_a * n_b / n * (mean_a - mean_b) ** 2) / max(n - 1, 1)
            self.score_mean_, self.score_std_ = mean, var.sqrt().clamp_min(1e-6 * float(var.sqrt().mean()) + 1e-12)
        return self

    def anomaly_map(self, features: torch.Tensor) -> torch.Tensor:
        """Patch anomaly scores ``(B, h, w)``, higher = more anomalous."""
        self._check_input(features)
        scores = self._patch_scores(features)
        if self.normalized:
            self._check_grid(features)
            scores = ((scores - self.score_mean_) / self.score_std_).to(scores.dtype)
        return scores

    def _fold_model(self, rest: torch.Tensor) -> Detector:
        """A model of these settings fitted on ``rest``, the fitted images less one fold."""
        return type(self)(self.settings).fit(rest)

    @torch.no_grad()
    def held_out_detect(self, features: torch.Tensor, folds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`detect` of every image fitted on (``features``, in the fit's order) by a model fitted without its
        fold (``folds``: a fold index per image): the cross-fitting behind the threshold, so that each good image is
        scored as an unseen one. This default refits a model per fold; PaDiM leaves each image out exactly, PatchCore
        leaves each image's own patches out of the search, and the mixtures warm-start EM from the fit."""
        self._check_input(features)
        folds = folds.to(features.device)
        maps = features.new_empty((len(features), *features.shape[-2:]))
        scores = None
        for fold in folds.unique().tolist():
            inside = folds == fold
            fold_maps, fold_scores = self._fold_model(features[~inside]).detect(features[inside])
            maps[inside] = fold_maps.to(maps.dtype)
            if fold_scores is not None:
                scores = features.new_zeros(len(features)) if scores is None else scores
                scores[inside] = fold_scores.to(scores.dtype)
        return maps, scores

    @torch.no_grad()
    def detect(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch maps ``(B, h, w)`` and the detector's own image scores ``(B,)``, or ``None``
        to score an image by the maximum of its smoothed pixel map (the default)."""
        return self.anomaly_map(features), None
