"""Cross-fitting: every fitted image scored by a model that did not see it, exact where the maths allows."""

import pytest
import torch

from anomatune.models.registry import create_detector
from anomatune.models.settings import detector_settings
from anomatune.pipeline.pipeline import fold_indices


def features(n=10, d=4, h=3, w=3, seed=0):
    return torch.randn(n, d, h, w, generator=torch.Generator().manual_seed(seed))


def test_folds_are_seeded_and_balanced():
    folds = fold_indices(11, 5, seed=0)
    assert torch.equal(folds, fold_indices(11, 5, seed=0)) and not torch.equal(folds, fold_indices(11, 5, seed=1))
    assert sorted(torch.bincount(folds).tolist()) == [2, 2, 2, 2, 3]
    assert fold_indices(3, 5, seed=0).sort().values.tolist() == [0, 1, 2]  # never more folds than images


def test_padim_leaves_each_image_out_exactly():
    x = features(12, d=5)
    detector = create_detector(detector_settings("padim")).fit(x)
    maps, scores = detector.held_out_detect(x, fold_indices(12, 4, seed=0))
    assert scores is None and maps.shape == (12, 3, 3)
    for i in range(12):
        refit = create_detector(detector_settings("padim")).fit(torch.cat([x[:i], x[i + 1 :]]))
        torch.testing.assert_close(maps[i].double(), refit.anomaly_map(x[i : i + 1])[0].double(), rtol=1e-6, atol=1e-6)
    assert (maps > detector.anomaly_map(x)).all()  # unseen images score higher than seen ones


def test_the_default_cross_fitting_refits_each_fold():
    x = features(12, d=5)
    settings = detector_settings("padim", normalize=True)  # the normalisation needs each fold's own statistics
    detector = create_detector(settings).fit(x)
    folds = fold_indices(12, 4, seed=0)
    maps, _ = detector.held_out_detect(x, folds)
    for fold in range(4):
        inside = folds == fold
        refit = create_detector(settings).fit(x[~inside])
        torch.testing.assert_close(maps[inside].double(), refit.anomaly_map(x[inside]).double(), rtol=1e-6, atol=1e-6)


def test_patchcore_leaving_an_image_out_equals_a_bank_built_without_it():
    x = features(6, d=4)
    settings = detector_settings("patchcore", coreset_ratio=1.0, max_patches=None, num_neighbors=3)
    detector = create_detector(settings).fit(x)
    maps, scores = detector.held_out_detect(x, fold_indices(6, 5, seed=0))
    for i in range(6):
        without = create_detector(settings).fit(torch.cat([x[:i], x[i + 1 :]]))
        expected_maps, expected_scores = without.detect(x[i : i + 1])
        torch.testing.assert_close(maps[i : i + 1], expected_maps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores[i : i + 1], expected_scores, rtol=1e-5, atol=1e-5)
    assert detector.detect(x)[0].max() < 1e-2 < maps.min()  # in-sample, every patch finds itself (to rounding)


@pytest.mark.parametrize("name", ["gmm", "glad"])
def test_the_mixtures_refit_each_fold_from_the_fit(name):
    x = features(10, d=3, seed=2)
    settings = detector_settings(name, n_components=2, max_iter=5)
    detector = create_detector(settings).fit(x)
    folds = fold_indices(10, 5, seed=0)
    maps, scores = detector.held_out_detect(x, folds)
    assert scores is None and maps.shape == (10, 3, 3) and torch.isfinite(maps).all()
    inside = folds == 0
    warm = create_detector(settings).fit(x[~inside], start=detector)
    torch.testing.assert_close(maps[inside], warm.anomaly_map(x[inside]))
    assert int(warm.n_iter_) <= 5
