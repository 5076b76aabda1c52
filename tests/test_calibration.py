"""The calibration of out-of-fold scores: the tail model, the threshold of a false-alarm rate, the normalised score."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from anomatune.calibration import ScoreCalibration, clopper_pearson, gpd_pwm, images_for_tight
from anomatune.errors import AnomatuneError


@pytest.mark.parametrize("shape", [0.0, 0.2])
def test_the_tail_model_recovers_a_known_quantile_beyond_the_data(shape):
    truth = stats.genpareto(c=shape, scale=1.0)
    scores = truth.rvs(size=4000, random_state=np.random.default_rng(1))
    rate = 1e-4  # a quarter of the rate of the largest of 4000 scores: only the tail model reaches it
    calibration = ScoreCalibration.fit(scores, rate)
    assert calibration.count_above == 0
    assert calibration.threshold == pytest.approx(truth.isf(rate), rel=0.15)
    assert calibration.false_alarm_rate(truth.isf(1e-3)).item() == pytest.approx(1e-3, rel=0.25)


def test_the_pwm_fit_recovers_shape_and_scale():
    draws = stats.genpareto(c=0.25, scale=2.0).rvs(size=(200, 2000), random_state=np.random.default_rng(0))
    shape, scale = gpd_pwm(draws)
    assert np.median(shape) == pytest.approx(0.25, abs=0.03) and np.median(scale) == pytest.approx(2.0, rel=0.05)
    bounded = gpd_pwm(stats.uniform.rvs(size=500, random_state=np.random.default_rng(0)))[0]
    assert bounded[0] == 0.0  # a bounded tail is floored at the exponential


def test_a_threshold_inside_the_data_is_the_empirical_quantile_and_half_on_the_normalised_scale():
    scores = np.arange(1, 100, dtype=float)  # 99 scores: plotting positions (100 - i) / 100
    calibration = ScoreCalibration.fit(scores, 0.2)
    assert calibration.threshold == pytest.approx(80.0)  # 20 % of good parts above it
    assert calibration.rate_at_threshold == pytest.approx(0.2) and calibration.count_above == 19
    assert calibration.normalized([calibration.threshold]).item() == pytest.approx(0.5)
    grid = np.linspace(-10, 300, 500)
    normalized = calibration.normalized(grid)
    assert np.all(np.diff(normalized) >= 0) and normalized.min() >= 0 and normalized.max() == 1.0
    assert np.array_equal(normalized > 0.5, grid > calibration.threshold)
    assert calibration.score_at(0.2) == pytest.approx(80.0)


def test_a_more_confident_bound_is_a_higher_threshold_and_overrides_win():
    scores = stats.gamma(4).rvs(size=40, random_state=np.random.default_rng(3))
    cautious, estimate = ScoreCalibration.fit(scores, 0.01, confidence=0.9), ScoreCalibration.fit(scores, 0.01)
    assert cautious.threshold > estimate.threshold and cautious.rate_at_threshold < 0.01
    assert ScoreCalibration.fit(scores, 0.01, quantile=0.5).threshold == pytest.approx(np.quantile(scores, 0.5))
    assert ScoreCalibration.fit(scores, 0.01, quantile=0.5).target_rate is None
    assert ScoreCalibration.fit(scores, 0.01, threshold=3.0).threshold == 3.0


def test_the_interval_and_the_images_that_make_it_tight():
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.187086, abs=1e-5) and high == pytest.approx(0.812914, abs=1e-5)
    assert images_for_tight(0.05) < images_for_tight(0.01)
    n = images_for_tight(0.05)
    low, high = clopper_pearson(round(0.05 * n), n)
    assert low >= 0.025 and high <= 0.1


def test_the_calibration_round_trips_through_json():
    calibration = ScoreCalibration.fit(np.random.default_rng(0).normal(size=30), 0.05)
    again = ScoreCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration
    assert "expected false-alarm rate" in calibration.describe()
    with pytest.raises(AnomatuneError, match="lacks 'threshold'"):
        ScoreCalibration.from_dict({k: v for k, v in calibration.to_dict().items() if k != "threshold"})


def test_too_few_or_not_finite_scores_are_refused():
    with pytest.raises(AnomatuneError, match="are 1: a calibration needs at least 2"):
        ScoreCalibration.fit([1.0], 0.01)
    with pytest.raises(AnomatuneError, match="are not all finite"):
        ScoreCalibration.fit([1.0, math.nan, 2.0], 0.01)
