"""Negatives: natural photos, random-resized-cropped and colour-mapped onto good product images.

Every random draw goes through one ``torch.Generator`` whose state is saved with the
checkpoints, so a resumed run draws exactly the negatives an uninterrupted one would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.color import transfer
from ..data.datasets import NaturalImages
from .settings import FinetuneSettings


def random_resized_crop(image: torch.Tensor, size: tuple[int, int], min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """A crop of area share U[min_scale, 1] and aspect ratio in [3/4, 4/3] (log-uniform), resized to ``size``."""
    _, h, w = image.shape
    area = h * w * (min_scale + (1 - min_scale) * torch.rand((), generator=generator).item())
    ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand((), generator=generator).item())
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(h - ch + 1, (), generator=generator))
    left = int(torch.randint(w - cw + 1, (), generator=generator))
    crop = image[:, top : top + ch, left : left + cw]
    return F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def patch_mask(masks: torch.Tensor, grid) -> torch.Tensor:
    """Which patches of a ``(B, 1, H, W)`` pixel mask batch are negative (mostly covered), flattened like the features."""
    return F.adaptive_avg_pool2d(masks, tuple(grid)).flatten() > 0.5


class NegativeSampler:
    """Batches of natural crops colour-mapped onto randomly drawn good images with ρ ~ U[ρ_min, 1].

    ``negative_mode="photos"`` (the paper): whole images. ``"pasted"`` (ours): the mapped
    crop, of side U[paste_min, paste_max] of the image's, is pasted at a random place into
    the good image it was mapped onto, so the negative patches live in the product's
    context; the mask says which pixels are negative. The settings are the
    :class:`FinetuneSettings`' negative fields.
    """

    def __init__(self, natural: NaturalImages, good_images: torch.Tensor, settings: FinetuneSettings):
        self.natural, self.good_images, self.settings = natural, good_images, settings
        self.size = tuple(good_images.shape[-2:])

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` negatives ``(n, 3, H, W)`` in [0, 1] and their negative-pixel masks ``(n, 1, H, W)``."""
        picks = torch.randint(len(self.natural), (n,), generator=generator).tolist()
        s = self.settings
        crops = torch.stack([random_resized_crop(self.natural[i], self.size, s.crop_min, generator) for i in picks])
        targets = self.good_images[torch.randint(len(self.good_images), (n,), generator=generator)]
        rho = s.rho_min + (1 - s.rho_min) * torch.rand(n, generator=generator, dtype=torch.float64)
        mapped = transfer(crops, targets, rho, s.color_method).clamp(0, 1)
        if s.negative_mode == "photos":
            return mapped, torch.ones(n, 1, *self.size)
        images, masks = targets.clone(), torch.zeros(n, 1, *self.size)
        h, w = self.size
        for i in range(n):
            side = s.paste_min + (s.paste_max - s.paste_min) * torch.rand(2, generator=generator)
            ph, pw = max(1, round(side[0].item() * h)), max(1, round(side[1].item() * w))
            top, left = int(torch.randint(h - ph + 1, (), generator=generator)), int(torch.randint(w - pw + 1, (), generator=generator))
            patch = F.interpolate(mapped[i : i + 1], size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)[0]
            images[i, :, top : top + ph, left : left + pw] = patch
            masks[i, :, top : top + ph, left : left + pw] = 1.0
        return images, masks
