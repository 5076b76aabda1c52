"""A candidate's score on a validation set: per family, image AUROC and AUPRO, and one aggregate.

The aggregate is the mean over the families of the image AUROC: what the choices it
makes (detector, projection, stages, checkpoint) are judged by on real defects.
``benchmarks/validation.py`` measures how well it ranks candidates by their test metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import image_auroc, pixel_curves, pixel_metrics
from ..models.registry import create_detector
from ..models.settings import DetectorSettings
from ..pipeline.postprocess import PostProcessor
from ..pipeline.settings import PostprocessSettings
from .sets import GOOD, ValidationSet

PIXEL_POOL = 4  # AUPRO on maps pooled to a quarter of the side: the ranking barely changes, the cost does
SCORE_BATCH = 16


def validation_metrics(valset: ValidationSet, maps: torch.Tensor, scores: torch.Tensor) -> dict:
    """``{"families": {family: {"image_auroc", "aupro"}}, "image_auroc", "aupro", "score"}`` of pixel maps
    ``(N, H, W)`` and image scores ``(N,)`` of ``valset``'s images; ``score`` is the aggregate (higher is better)."""
    groups = np.array(valset.groups)
    labels, scores = valset.labels.numpy(), scores.double().numpy()
    factor = PIXEL_POOL if min(maps.shape[-2:]) >= 32 * PIXEL_POOL else 1
    small = F.avg_pool2d(maps.float()[:, None], factor).squeeze(1).numpy()
    truth = (F.avg_pool2d(valset.masks.float(), factor).squeeze(1) > 0.5).numpy()
    known = valset.has_masks.numpy()
    families = {}
    for family in valset.families:
        chosen = (groups == GOOD) | (groups == family)
        with_mask = chosen & known
        aupro = float("nan")
        if truth[with_mask].any():
            aupro = pixel_metrics(pixel_curves(truth[with_mask], small[with_mask]))["aupro"]
        families[family] = {"image_auroc": image_auroc(labels[chosen], scores[chosen]), "aupro": aupro}
    image = float(np.nanmean([f["image_auroc"] for f in families.values()]))
    aupros = [f["aupro"] for f in families.values() if np.isfinite(f["aupro"])]
    return {
        "families": families,
        "image_auroc": image,
        "aupro": float(np.mean(aupros)) if aupros else float("nan"),
        "score": image,
    }


@torch.no_grad()
def detector_outputs(detector, features: torch.Tensor, input_size: tuple[int, int], postprocess: PostprocessSettings):
    """Pixel maps and image scores of a fitted detector on features ``(N, D, h, w)``, batch by batch, on the CPU."""
    post = PostProcessor(postprocess, input_size)
    maps, scores = zip(*(post(*detector.detect(chunk)) for chunk in torch.split(features, SCORE_BATCH)))
    return torch.cat(maps).cpu(), torch.cat(scores).cpu()


def score_detector(
    settings: DetectorSettings | str,
    fit_features: torch.Tensor,
    features: torch.Tensor,
    valset: ValidationSet,
    postprocess: PostprocessSettings | None = None,
) -> dict:
    """Fit a detector on good ``fit_features`` and score the ``features`` of ``valset``'s images
    (both ``(N, D, h, w)``, on the device to compute on): :func:`validation_metrics`."""
    detector = create_detector(settings).fit(fit_features)
    maps, scores = detector_outputs(detector, features, tuple(valset.images.shape[-2:]), postprocess or PostprocessSettings())
    return validation_metrics(valset, maps, scores)
