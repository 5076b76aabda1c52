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


def test_the_standardisation_is_each_pixels_mean_and_std_over_the_good_maps():
    torch.manual_seed(0)
    good = torch.rand(7, 4, 4) * torch.linspace(1, 5, 4)  # columns of growing spread
    post = PostProcessor(PostprocessSettings(sigma=0.0, standardize=True), (4, 4))
    post.learn(good, batch=3)  # in batches: the same as all at once
    torch.testing.assert_close(post.pixel_mean, good.mean(0))
    torch.testing.assert_close(post.pixel_std, good.std(0))
    maps, scores = post(good)
    torch.testing.assert_close(maps.mean(0), torch.zeros(4, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(maps.std(0), torch.ones(4, 4), atol=1e-5, rtol=0)
    assert torch.equal(scores, maps.flatten(1).amax(1))
    off = PostProcessor(PostprocessSettings(sigma=0.0), (4, 4), post.state_dict())  # learnt, but not asked for
    torch.testing.assert_close(off(good)[0], good)


def test_a_standardised_run_saves_and_loads_its_statistics(brick, tmp_path):
    from anomatune import Pipeline, open_dataset
    from anomatune.folders.kinds import RunFolder
    from tests.conftest import FAST

    fitted = Pipeline(detector="padim", device="cpu", standardize=True, **FAST).fit(open_dataset(data=brick, category="brick"))
    version = fitted.save(tmp_path / "run")
    assert (version / RunFolder.POSTPROCESS).is_file()
    peaks = fitted.calibration_["peaks"]  # out-of-fold peaks of standardised maps: a few standard deviations
    assert 0 < np.median(peaks) < 20
    images = sorted((brick / "brick" / "test").rglob("*.png"))[:3]
    loaded = Pipeline.load(tmp_path / "run", device="cpu")
    np.testing.assert_array_equal(loaded.predict(images).scores, fitted.predict(images).scores)
