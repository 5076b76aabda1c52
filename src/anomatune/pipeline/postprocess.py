"""One post-processing path for every detector and every output (evaluate, predict, export, serve).

Patch maps ``(B, h, w)`` are upsampled (bilinear) to the input size, smoothed by a
Gaussian and, with ``standardize``, standardised pixel by pixel by the good images'
out-of-fold maps (:meth:`PostProcessor.learn`); an image's score is the maximum of its
map, unless the detector has its own (PatchCore). The smoothing's reflected border averages
fewer independent values, so without the standardisation a good image's map peaks at its
border more often than elsewhere (``benchmarks/results/standardize.md``). For a user, maps are resized to each image's own size and a pixel
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
    """Patch maps and optional image scores → pixel maps at the input size and image scores.

    ``pixel_mean`` and ``pixel_std`` (``(H, W)``, learnt by :meth:`learn`, saved with the run) standardise the maps
    when ``standardize`` is set."""

    def __init__(self, settings: PostprocessSettings, input_size: tuple[int, int], state: dict | None = None):
        self.settings, self.input_size = settings, tuple(input_size)
        self.pixel_mean = self.pixel_std = None
        if state:
            self.pixel_mean, self.pixel_std = state["pixel_mean"].float(), state["pixel_std"].float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`learn` learnt (empty when nothing was)."""
        return {} if self.pixel_mean is None else {"pixel_mean": self.pixel_mean.cpu(), "pixel_std": self.pixel_std.cpu()}

    def smoothed(self, patch_maps: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(patch_maps.unsqueeze(1).float(), size=self.input_size, mode="bilinear", align_corners=False).squeeze(1)
        return gaussian_blur(up, self.settings.sigma)

    @torch.no_grad()
    def learn(self, patch_maps: torch.Tensor, batch: int = 16) -> None:
        """Each pixel's mean and standard deviation over good images' out-of-fold patch maps, once smoothed (in
        batches, float64 sums: the smoothed maps are never all held)."""
        total = squares = 0.0
        for i in range(0, len(patch_maps), batch):
            maps = self.smoothed(patch_maps[i : i + batch]).double()
            total, squares = total + maps.sum(0), squares + (maps**2).sum(0)
        n = len(patch_maps)
        mean = total / n
        var = (squares - n * mean**2).clamp_min(0) / max(n - 1, 1)
        std = var.sqrt()
        self.pixel_mean, self.pixel_std = mean.float(), std.clamp_min(1e-6 * float(std.mean()) + 1e-12).float()

    def __call__(self, patch_maps: torch.Tensor, image_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.smoothed(patch_maps)
        if self.settings.standardize and self.pixel_mean is not None:
            maps = (maps - self.pixel_mean.to(maps.device)) / self.pixel_std.to(maps.device)
        return maps, maps.flatten(1).amax(1) if image_scores is None else image_scores
