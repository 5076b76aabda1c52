"""Post-processing: smoothing, resizing to each image's size, masks that agree with the decision."""

import numpy as np
import pytest
import torch

from anomatune.pipeline.postprocess import PostProcessor, defect_mask, gaussian_blur, resize_map
from anomatune.pipeline.settings import PostprocessSettings


def test_gaussian_blur_preserves_constants_and_mass():
    flat = torch.full((1, 20, 20), 3.0)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    assert gaussian_blur(spike, 2.0).sum() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(gaussian_blur(spike, 0.0), spike)


def test_scores_are_the_peak_of_the_smoothed_map_unless_the_detector_has_its_own():
    post = PostProcessor(PostprocessSettings(sigma=1.0), (16, 12))
    patch = torch.rand(2, 4, 3)
    maps, scores = post(patch)
    assert maps.shape == (2, 16, 12) and torch.equal(scores, maps.flatten(1).amax(1))
    own = torch.tensor([5.0, 6.0])
    assert torch.equal(post(patch, own)[1], own)


def test_maps_come_back_at_each_images_size():
    heat = torch.arange(16.0).view(4, 4)
    assert resize_map(heat, (30, 40)).shape == (30, 40) and resize_map(heat, (4, 4)).dtype == np.float32


def test_the_mask_is_empty_exactly_for_good_images():
    heat = np.array([[0.0, 0.2], [0.4, 0.9]])
    assert defect_mask(heat, 0.3, True).sum() == 2
    assert not defect_mask(heat, 0.3, False).any()  # a good decision never draws a defect
    below = defect_mask(heat, 0.95, True)  # resizing lowered the peak below the threshold: the peak is kept
    assert below.sum() == 1 and below[1, 1]
