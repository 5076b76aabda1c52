"""What every detector shares: fitting on patch features, maps, scores, saving.

A detector sees patch features ``(N, D, h, w)``. ``anomaly_map`` gives a patch-level map
``(B, h, w)`` (higher = more anomalous); ``predict`` turns it into pixel maps (bilinear
upsampling to the image size, then a Gaussian with sigma 4 px, the MVTec protocol) and
image scores (the maximum of the smoothed map, unless a detector knows better).
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
    """Base class: subclasses set ``name``, implement ``fit`` and ``anomaly_map``.

    ``config()`` returns the constructor's settings, so ``type(d)(**d.config())`` followed
    by ``load_state_dict`` rebuilds a fitted detector.
    """

    name: ClassVar[str]
    differentiable: ClassVar[bool] = False

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def config(self) -> dict:
        raise NotImplementedError

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

    def fit(self, features: torch.Tensor) -> "Detector":
        raise NotImplementedError

    def anomaly_map(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
