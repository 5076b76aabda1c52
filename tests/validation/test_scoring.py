"""A candidate's validation metrics, against hand-computed cases."""

import math

import pytest
import torch

from anomatune.validation.scoring import score_detector, validation_metrics
from anomatune.validation.sets import ValidationSet


def _valset() -> ValidationSet:
    """2 good images, then 2 of family a and 2 of family b, each defect in the top-left 32x32 quarter."""
    masks = torch.zeros(6, 1, 128, 128)
    masks[2:, :, :32, :32] = 1
    groups = ["good", "good", "a", "a", "b", "b"]
    return ValidationSet(
        torch.zeros(6, 3, 128, 128), torch.tensor([0, 0, 1, 1, 1, 1]), masks, groups, torch.ones(6, dtype=torch.bool)
    )


def test_each_family_is_ranked_against_the_good_images_alone():
    valset = _valset()
    maps = valset.masks[:, 0].clone()  # perfect maps: the defect, exactly
    scores = torch.tensor([0.5, 0.1, 0.9, 0.8, 0.3, 0.05])  # a above both good; b: 0.3 > 0.1, below 0.5; 0.05 below both
    result = validation_metrics(valset, maps, scores)
    assert result["families"]["a"]["image_auroc"] == 1.0
    assert result["families"]["b"]["image_auroc"] == pytest.approx(0.25)  # 1 of the 4 pairs ordered right
    assert result["score"] == pytest.approx((1.0 + 0.25) / 2) == result["image_auroc"]
    assert result["families"]["a"]["aupro"] == pytest.approx(1.0) and result["aupro"] == pytest.approx(1.0)


def test_a_family_without_known_masks_has_no_aupro():
    valset = _valset()
    valset.has_masks[4:] = False
    result = validation_metrics(valset, valset.masks[:, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert math.isnan(result["families"]["b"]["aupro"]) and result["aupro"] == pytest.approx(1.0)


def test_score_detector_fits_then_ranks_separable_features_perfectly():
    generator = torch.Generator().manual_seed(0)
    good = torch.randn(12, 4, 4, 4, generator=generator) * 0.1
    valset = _valset()
    features = good[:6].clone()
    features[2:, :, :1, :1] += 10.0  # the anomalous patches: the grid's top-left cell, under the masks
    result = score_detector("padim", good, features, valset)
    assert result["score"] == 1.0 and result["aupro"] > 0.9
