"""One post-processing path for every detector and every output (evaluate, predict, export, serve).

Patch maps ``(B, h, w)`` are upsampled (bilinear) to the input size and smoothed by a
Gaussian; an image's score is the maximum of its smoothed map, unless the detector has
its own (PatchCore). For a user, maps are resized to each image's own size and a pixel
is defective when its score exceeds the threshold; an image is "defective" exactly when
its mask is not empty (if resizing lowers the peak below the threshold, the peak pixel
is kept).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .settings import PostprocessSettings


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


def resize_map(heat: torch.Tensor, size_hw: tuple[int, int]) -> np.ndarray:
    """One ``(H, W)`` map resized (bilinear) to ``size_hw``, as a float32 array."""
    if tuple(heat.shape) != tuple(size_hw):
        heat = F.interpolate(heat[None, None].float(), size=tuple(size_hw), mode="bilinear", align_corners=False)[0, 0]
    return heat.cpu().numpy().astype(np.float32, copy=False)


def defect_mask(heat: np.ndarray, threshold: float, defective: bool) -> np.ndarray:
    """Pixels above ``threshold``; empty for a good image, never empty for a defective one."""
    if not defective:
        return np.zeros(heat.shape, dtype=bool)
    mask = heat > threshold
    if not mask.any():
        mask.flat[int(np.argmax(heat))] = True
    return mask


class PostProcessor:
    """Patch maps and optional image scores → pixel maps at the input size and image scores."""

    def __init__(self, settings: PostprocessSettings, input_size: tuple[int, int]):
        self.settings, self.input_size = settings, tuple(input_size)

    def __call__(self, patch_maps: torch.Tensor, image_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        up = F.interpolate(patch_maps.unsqueeze(1).float(), size=self.input_size, mode="bilinear", align_corners=False).squeeze(1)
        maps = gaussian_blur(up, self.settings.sigma)
        return maps, maps.flatten(1).amax(1) if image_scores is None else image_scores
