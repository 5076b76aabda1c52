"""Validation without test labels: held-out good images, with and without synthetic defects.

A seeded share of the good training images is set aside. The validation set is those
images as they are (good), and the same images with one synthetic defect each, of two
kinds that the training negatives do not use:

- ``natural``: a crop of a natural photo from a *second* source (``--validation-negatives``,
  e.g. ``imagen`` when the negatives are ``imagenet_samples``), colour-mapped and pasted;
- ``noise``: a smooth-noise (Perlin-like, as in DRAEM) blob that distorts the image's own
  colours, made from no photo at all.

Each checkpoint is scored by a detector refit on the current features of a few training
images (``validator``, PaDiM by default: a closed-form fit that takes a second and sees
every feature dimension the detectors on top see); the score is the mean of the image
and pixel AUROC. Nothing here reads a test image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.datasets import NaturalImages, seeded_split
from ..metrics import image_auroc, pixel_auroc
from ..models.registry import create_detector
from ..models.settings import detector_settings
from ..pipeline.postprocess import PostProcessor
from ..pipeline.settings import PostprocessSettings
from .negatives import NegativeSampler
from .settings import FinetuneSettings

# Defects smaller and fainter than the training negatives, so that the frozen features do not already find them all
PASTE_SIDE = (0.05, 0.15)  # side of a pasted natural crop, as a share of the image side
NOISE_AREA = (0.005, 0.03)  # share of the image a noise defect covers
NOISE_STRENGTH = (0.1, 0.3)  # largest colour change of a noise defect, on the [0, 1] scale
MAX_HELD_OUT = 40  # held-out good images at most: 120 validation images, enough to rank checkpoints, cheap to score
PIXEL_POOL = 4  # pixel AUROC on maps pooled to a quarter of the side: the ranking barely changes, the cost does


def holdout(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``n`` training images: (kept for training, held out); when holding out at all, at least 2 of
    each and at most ``MAX_HELD_OUT`` held out."""
    n_held = 0 if share == 0 else min(max(2, round(share * n)), n - 2, MAX_HELD_OUT)
    kept, held = seeded_split(n, n_held, seed)
    return torch.tensor(kept, dtype=torch.long), torch.tensor(held, dtype=torch.long)


def smooth_noise(shape: tuple[int, ...], size: tuple[int, int], cells: int, generator: torch.Generator) -> torch.Tensor:
    """Random values on a coarse ``cells``-per-side grid, upsampled bicubically: a smooth field in about [-1, 1]."""
    coarse = torch.rand(*shape, cells + 1, cells + 1, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)


def noise_defects(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One smooth-noise defect per image: a thresholded noise field's blobs, inside which the colours are distorted."""
    n, _, h, w = images.shape
    out, masks = images.clone(), torch.zeros(n, 1, h, w)
    for i in range(n):
        cells = int(2 ** torch.randint(1, 4, (), generator=generator))
        field = smooth_noise((1, 1), (h, w), cells, generator)[0, 0]
        area = NOISE_AREA[0] + (NOISE_AREA[1] - NOISE_AREA[0]) * torch.rand((), generator=generator).item()
        mask = (field > torch.quantile(field.flatten(), 1 - area)).float()
        strength = NOISE_STRENGTH[0] + (NOISE_STRENGTH[1] - NOISE_STRENGTH[0]) * torch.rand((), generator=generator).item()
        change = strength * smooth_noise((1, 3), (h, w), cells * 4, generator)[0]
        out[i] = (images[i] + mask * change).clamp(0, 1)
        masks[i, 0] = mask
    return out, masks


@dataclass
class ValidationSet:
    """Images ``(N, 3, H, W)``, image labels ``(N,)`` (1 = defective), pixel masks ``(N, 1, H, W)``, each defect's kind."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    kinds: list[str]

    @classmethod
    def build(cls, held: torch.Tensor, natural: NaturalImages | None, settings: FinetuneSettings, seed: int) -> ValidationSet:
        """The held-out good images, then each with a natural-photo defect (when ``natural`` is given), then with a noise defect."""
        generator = torch.Generator().manual_seed(seed)
        images, masks, kinds = [held], [torch.zeros(len(held), 1, *held.shape[-2:])], ["good"] * len(held)
        if natural is not None:
            sampler = NegativeSampler(
                natural, held, settings.updated(negative_mode="pasted", paste_min=PASTE_SIDE[0], paste_max=PASTE_SIDE[1])
            )
            pasted, pasted_masks = sampler.sample(len(held), generator, targets=held)
            images.append(pasted), masks.append(pasted_masks)
            kinds += ["natural"] * len(held)
        noisy, noise_masks = noise_defects(held, generator)
        images.append(noisy), masks.append(noise_masks)
        kinds += ["noise"] * len(held)
        labels = torch.tensor([kind != "good" for kind in kinds], dtype=torch.long)
        return cls(torch.cat(images), labels, torch.cat(masks), kinds)


def validation_score(
    validator: str, fit_features: torch.Tensor, features: torch.Tensor, valset: ValidationSet, seed: int
) -> dict:
    """Refit ``validator`` on ``fit_features`` and score ``features`` of ``valset`` (both on the device to compute on):
    image and pixel AUROC, and their mean."""
    settings = detector_settings(validator)
    detector = create_detector(settings.updated(seed=seed) if hasattr(settings, "seed") else settings).fit(fit_features)
    post = PostProcessor(PostprocessSettings(), tuple(valset.images.shape[-2:]))
    maps, scores = zip(*(post(*detector.detect(chunk)) for chunk in torch.split(features, 16)))
    maps, scores = torch.cat(maps).cpu(), torch.cat(scores).cpu()
    factor = PIXEL_POOL if min(maps.shape[-2:]) >= 32 * PIXEL_POOL else 1
    small = F.avg_pool2d(maps[:, None], factor).squeeze(1)
    truth = F.avg_pool2d(valset.masks, factor).squeeze(1) > 0.5
    result = {
        "image_auroc": image_auroc(valset.labels.numpy(), scores.numpy()),
        "pixel_auroc": pixel_auroc(truth.numpy(), small.numpy()),
    }
    result["score"] = float(
        np.nanmean([result["image_auroc"], result["pixel_auroc"]])
    )  # image AUROC alone if no pixel is defective
    return result
