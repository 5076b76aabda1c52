"""Negatives: natural photos colour-mapped onto good product images, boxes cut from the product itself, or near
negatives (the validation's synthetic anomaly families, drawn from the fine-tuning's own seeds and photos).

Every random draw goes through one ``torch.Generator`` whose state is saved with the
checkpoints, so a resumed run draws exactly the negatives an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data.color import transfer
from ..data.datasets import NaturalImages
from ..validation.settings import FAMILIES
from ..validation.synthetic import synthesize
from .settings import IMAGE_NEGATIVES, FinetuneSettings

TEXTURES = 8  # natural crops drawn per call as the texture family's sources
TOUCHED = 0.5  # mask value of pixels a synthetic anomaly changed outside its mask: neither negative nor context


class Negatives(NamedTuple):
    """Negative images ``(n, 3, H, W)`` in [0, 1], their masks ``(n, 1, H, W)`` (1: negative pixel, ``TOUCHED``: changed
    around it, 0: as the good image) and severities ``(n,)`` (in [0, 1] for the synthetic kind, 1 for the others: a
    curriculum only holds back subtle synthetic ones)."""

    images: torch.Tensor
    masks: torch.Tensor
    severities: torch.Tensor


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


def most_covered(masks: torch.Tensor, grid) -> torch.Tensor:
    """Each image's most covered patch, as a flat mask like :func:`patch_mask`'s."""
    coverage = F.adaptive_avg_pool2d(masks, tuple(grid)).flatten(1)
    chosen = torch.zeros_like(coverage, dtype=torch.bool)
    chosen[torch.arange(len(coverage)), coverage.argmax(1)] = True
    return chosen.flatten()


def clean_mask(masks: torch.Tensor, grid) -> torch.Tensor:
    """Which patches of a ``(B, 1, H, W)`` mask batch hold no changed pixel (the good context of a near negative)."""
    return F.adaptive_max_pool2d(masks, tuple(grid)).flatten() == 0


def paste_box(size: tuple[int, int], side_min: float, side_max: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random box ``(top, left, height, width)`` whose sides are U[side_min, side_max] of the image's."""
    h, w = size
    side = side_min + (side_max - side_min) * torch.rand(2, generator=generator)
    ph, pw = max(1, round(side[0].item() * h)), max(1, round(side[1].item() * w))
    return (
        int(torch.randint(h - ph + 1, (), generator=generator)),
        int(torch.randint(w - pw + 1, (), generator=generator)),
        ph,
        pw,
    )


def paste(image: torch.Tensor, mask: torch.Tensor, content: torch.Tensor, box: tuple[int, int, int, int]) -> None:
    """Resize ``content`` into ``box`` of ``image`` and mark the box in ``mask`` (both in place)."""
    top, left, ph, pw = box
    image[:, top : top + ph, left : left + pw] = F.interpolate(
        content[None], size=(ph, pw), mode="bilinear", align_corners=False, antialias=True
    )[0]
    mask[:, top : top + ph, left : left + pw] = 1.0


class NegativeSampler:
    """Negative images and the masks of their negative pixels, of the kinds ``negative_mode`` names.

    - ``photos`` (the paper): natural crops colour-mapped onto a good image with
      ρ ~ U[ρ_min, 1], whole.
    - ``pasted`` (ours): the same crop, of side U[paste_min, paste_max] of the image's,
      pasted at a random place into the good image it was mapped onto.
    - ``cutpaste`` (ours, after CutPaste): a box of another good image of the product,
      brightness-jittered, pasted into a good image: no natural photo involved.
    - ``synthetic`` (ours): one anomaly of the validation's ``families`` (cycled) in a good
      image, at a severity drawn in [``floor``, 1] (the curriculum raises subtlety over the
      run); its texture family takes crops of the training photos, not the validation's.

    Kinds joined by ``+`` alternate over the batch (``noise``, a feature-space kind, is
    made by the training loop, not here). The settings are :class:`FinetuneSettings`'.
    """

    def __init__(
        self,
        natural: NaturalImages | None,
        good_images: torch.Tensor,
        settings: FinetuneSettings,
        families: tuple[str, ...] = FAMILIES,
    ):
        self.natural, self.good_images, self.settings, self.families = natural, good_images, settings, families
        self.size = tuple(good_images.shape[-2:])
        self.kinds = [kind for kind in settings.negative_kinds if kind in IMAGE_NEGATIVES]

    def sample(self, n: int, generator: torch.Generator, targets: torch.Tensor | None = None, floor: float = 0.0) -> Negatives:
        """``n`` negatives with their masks and severities (synthetic ones at a severity in [``floor``, 1]).

        ``targets``: the good images to put them in (default: drawn from the good images).
        """
        s = self.settings
        kinds = [self.kinds[i % len(self.kinds)] for i in range(n)]
        if targets is None:
            targets = self.good_images[torch.randint(len(self.good_images), (n,), generator=generator)]
        images = targets.clone()
        masks = torch.zeros(n, 1, *self.size)
        severities = torch.ones(n)
        natural = [i for i, kind in enumerate(kinds) if kind in ("photos", "pasted")]
        if natural:
            for i, crop in zip(natural, self.natural_crops(images[natural], generator)):
                if kinds[i] == "photos":
                    images[i], masks[i] = crop, 1.0
                else:
                    paste(images[i], masks[i], crop, paste_box(self.size, s.paste_min, s.paste_max, generator))
        for i in (i for i, kind in enumerate(kinds) if kind == "cutpaste"):
            top, left, ph, pw = paste_box(self.size, s.paste_min, s.paste_max, generator)
            source = self.good_images[int(torch.randint(len(self.good_images), (), generator=generator))]
            brightness = 0.8 + 0.4 * torch.rand((), generator=generator).item()
            patch = (source[:, top : top + ph, left : left + pw] * brightness).clamp(0, 1)
            paste(images[i], masks[i], patch, paste_box(self.size, s.paste_min, s.paste_max, generator))
        synthetic = [i for i, kind in enumerate(kinds) if kind == "synthetic"]
        if synthetic:
            severities[synthetic] = floor + (1 - floor) * torch.rand(len(synthetic), generator=generator)
            photos = None
            if self.natural is not None:
                picks = torch.randint(len(self.natural), (TEXTURES,), generator=generator).tolist()
                photos = torch.stack([random_resized_crop(self.natural[i], self.size, s.crop_min, generator) for i in picks])
            for f, family in enumerate(self.families):
                rows = synthetic[f :: len(self.families)]
                if rows:
                    images[rows], masks[rows], _ = synthesize(family, images[rows], generator, photos, severities[rows])
            touched = (images[synthetic] != targets[synthetic]).any(1, keepdim=True)  # a warp or a blob fades out
            masks[synthetic] = torch.where(touched & (masks[synthetic] == 0), TOUCHED, masks[synthetic])
        return Negatives(images, masks, severities)

    def natural_crops(self, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random-resized natural crops colour-mapped onto ``targets`` with ρ ~ U[rho_min, 1]."""
        s = self.settings
        picks = torch.randint(len(self.natural), (len(targets),), generator=generator).tolist()
        crops = torch.stack([random_resized_crop(self.natural[i], self.size, s.crop_min, generator) for i in picks])
        rho = s.rho_min + (1 - s.rho_min) * torch.rand(len(targets), generator=generator, dtype=torch.float64)
        return transfer(crops, targets, rho, s.color_method).clamp(0, 1)
