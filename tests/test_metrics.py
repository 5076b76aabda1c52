"""MVTec metrics against hand-computed cases: AUROC, PRO regions, AUPRO, F1."""

import logging

import numpy as np
import pytest

from anomatune.metrics import (
    PixelCurves,
    f1_at,
    f1_optimal_threshold,
    image_auroc,
    image_roc,
    pixel_auroc,
    pixel_curves,
    pixel_metrics,
    split_metrics,
)


def evaluate_scores(labels, scores, masks, maps) -> dict:
    """The three MVTec metrics of a split."""
    metrics = split_metrics(labels, scores, pixel_curves(masks, maps))
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")}


def _case():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 2:6, 2:6] = True
    masks[2, 8:14, 3:5] = True
    masks[3, 0:3, 10:16] = True
    maps = rng.random(masks.shape)
    labels = masks.reshape(4, -1).any(1).astype(int)
    return labels, masks, maps


def test_perfect_map_scores_one_everywhere():
    labels, masks, _ = _case()
    maps = masks.astype(float)
    metrics = evaluate_scores(labels, maps.reshape(4, -1).max(1), masks, maps)
    assert metrics == {"image_auroc": 1.0, "pixel_auroc": 1.0, "aupro": 1.0}


def test_constant_map_gives_half():
    labels, masks, _ = _case()
    maps = np.zeros(masks.shape)
    assert image_auroc(labels, maps.reshape(4, -1).max(1)) == 0.5
    assert pixel_auroc(masks, maps) == 0.5


def test_pro_by_hand_two_regions():
    # Region A (4 pixels) gets score 0.9 on 2 of its pixels; region B (2 pixels) is fully at 0.8;
    # one defect-free pixel out of 10 has 0.85. Everything else scores 0.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0:4] = True  # A
    masks[0, 3, 0:2] = True  # B: not 8-connected to A
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0:2] = 0.9
    maps[0, 3, 0:2] = 0.8
    maps[0, 2, 3] = 0.85
    curves = PixelCurves.of(masks, maps)
    fpr, pro = curves.fpr, curves.pro
    # thresholds 0.9, 0.85, 0.8, 0: FPR 0, 0.1, 0.1, 1; PRO (0.5+0)/2, same, (0.5+1)/2, 1
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1.0])
    # area to FPR 0.3: 0.1*0.25 (0..0.1) + 0.2 * mean(0.75, PRO(0.3)), PRO(0.3) = 0.75 + 0.25*(0.2/0.9)
    pro_03 = 0.75 + 0.25 * (0.2 / 0.9)
    expected = (0.1 * 0.25 + 0.2 * (0.75 + pro_03) / 2) / 0.3
    assert pixel_metrics(curves)["aupro"] == pytest.approx(expected, abs=1e-12)


def test_eight_connectivity_makes_one_region():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    assert PixelCurves.of(masks, maps).pro[1] == pytest.approx(0.5)  # half of one region, not (1 + 0) / 2 of two


def test_strictly_increasing_transform_changes_nothing():
    labels, masks, maps = _case()
    maps = maps + masks * 0.3
    scores = maps.reshape(4, -1).max(1)
    before = evaluate_scores(labels, scores, masks, maps)
    after = evaluate_scores(labels, np.exp(3 * scores) - 7, masks, np.exp(3 * maps) - 7)
    assert before == pytest.approx(after, abs=1e-12)


def test_no_masks_skips_pixel_metrics_with_warning(caplog):
    labels, _, maps = _case()
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_scores(labels, maps.reshape(4, -1).max(1), None, maps)
    assert np.isnan(metrics["pixel_auroc"]) and np.isnan(metrics["aupro"]) and not np.isnan(metrics["image_auroc"])
    assert any("pixel AUROC skipped" in r.message for r in caplog.records)


def test_f1_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    assert f1_at(labels, scores, 0.5) == pytest.approx(2 * 2 / (3 + 3))  # tp 2, 3 predicted, 3 true
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert f1 == pytest.approx(2 * 3 / (3 + 4)) and threshold == pytest.approx(0.1)  # everything above 0.1: tp 3, 4 predicted


def test_pixel_metrics_from_one_sort_match_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    _, masks, maps = _case()
    maps = np.round(maps + masks * 0.2, 1)  # few distinct values: many ties across classes
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_auroc(masks, maps.astype(np.float32)) == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)


def test_image_auroc_and_roc_match_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.3 * labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(np.c_[image_roc(labels, scores)], np.c_[fpr, tpr], atol=1e-12)
