"""What every detector shares: fitting on patch features, maps, scores, saving.

A detector sees patch features ``(N, D, h, w)``. ``anomaly_map`` gives a patch-level map
``(B, h, w)`` (higher = more anomalous); ``predict`` turns it into pixel maps (bilinear
upsampling to the image size, then a Gaussian with sigma 4 px, the MVTec protocol) and
image scores (the maximum of the smoothed map, unless a detector knows better).

``normalize=True`` (ours, not in the papers) standardises each grid position's scores by
the mean and standard deviation of the training patches' scores there: a position whose
good patches always score high (an edge, a busy part) then stops dominating the image
score. Measured in ``benchmarks/results/detectors.md``.
The fitted state is a flat dict of tensors (``state_dict``) plus plain settings
(``config``): both are saved as safetensors and YAML, never pickled.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AnomatuneError


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps, truncated at 4 sigma, reflect padding."""
    if sigma <= 0:
        return maps
    radius = int(math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def postprocess(maps: torch.Tensor, image_size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Patch maps ``(B, h, w)`` → pixel maps ``(B, H, W)``: bilinear upsampling, then Gaussian smoothing."""
    up = F.interpolate(maps.unsqueeze(1).float(), size=image_size, mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(up, sigma)


def flatten_patches(features: torch.Tensor) -> torch.Tensor:
    """``(N, D, h, w)`` → ``(N*h*w, D)``, patches of one image contiguous."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class Detector:
    """Base class: subclasses set ``name``, implement ``_fit`` and ``_patch_scores``.

    ``config()`` returns the constructor's settings, so ``type(d)(**d.config())`` followed
    by ``load_state_dict`` rebuilds a fitted detector.
    """

    name: ClassVar[str]
    differentiable: ClassVar[bool] = False

    def __init__(self, normalize: bool = False):
        self.normalize = normalize
        self.state: dict[str, torch.Tensor] = {}

    def config(self) -> dict:
        return {"normalize": self.normalize}

    @property
    def fitted(self) -> bool:
        return bool(self.state)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise AnomatuneError(f"{self.name} is not fitted: call fit(train_features) first")

    def _check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 4:
            raise AnomatuneError(f"expected patch features (N, D, h, w), got shape {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise AnomatuneError("patch features contain NaN or infinite values: check the input images and the backbone weights")

    def _check_grid(self, features: torch.Tensor) -> None:
        """Per-position models only score the grid they were fitted on."""
        grid = tuple(self.state["grid"].tolist())
        if tuple(features.shape[-2:]) != grid:
            raise AnomatuneError(
                f"{self.name} was fitted on a {grid[0]}x{grid[1]} grid, got {features.shape[-2]}x{features.shape[-1]}: use the same image size"
            )

    def _fit(self, features: torch.Tensor) -> None:
        raise NotImplementedError

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, features: torch.Tensor) -> "Detector":
        """Fit on good patch features ``(N, D, h, w)``."""
        self._check_features(features)
        self.state = {}
        self._fit(features)
        self.state["grid"] = torch.tensor(features.shape[-2:])
        if self.normalize:
            with torch.no_grad():
                scores = torch.cat([self._patch_scores(chunk) for chunk in torch.split(features, 16)]).double()
            self.state["score_mean"] = scores.mean(0)
            self.state["score_std"] = scores.std(0).clamp_min(1e-6 * float(scores.std()) + 1e-12)
        return self

    def anomaly_map(self, features: torch.Tensor) -> torch.Tensor:
        """Patch anomaly scores ``(B, h, w)``, higher = more anomalous."""
        self._check_fitted()
        self._check_features(features)
        scores = self._patch_scores(features)
        if "score_mean" in self.state:
            self._check_grid(features)
            scores = ((scores - self.state["score_mean"]) / self.state["score_std"]).to(scores.dtype)
        return scores

    @torch.no_grad()
    def predict(self, features: torch.Tensor, image_size: tuple[int, int], sigma: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps ``(B, H, W)`` and image scores ``(B,)``: the maximum of the smoothed map."""
        maps = postprocess(self.anomaly_map(features), image_size, sigma)
        return maps, maps.flatten(1).amax(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Detector":
        self.state = dict(state)
        return self

    def to(self, device: torch.device | str) -> "Detector":
        self.state = {k: v.to(device) for k, v in self.state.items()}
        return self
