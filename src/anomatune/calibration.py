"""From good images' out-of-fold scores to decisions an operator can trust (torch-free).

A :class:`ScoreCalibration` turns the scores of good images, each scored by a model that did not see it, into

- the **false-alarm rate** of any score: the share of good parts that score higher. Below the tail start it is the
  empirical survival function (plotting positions ``(n + 1 − i) / (n + 1)`` of the sorted scores, linear between
  them); above it, a generalised Pareto tail (peaks over threshold) carries it beyond the largest score;
- the **threshold** of a false-alarm rate α: the tail model's α-quantile, taken at the upper ``confidence`` bound of a
  parametric bootstrap of the tail fit, so that a small folder gets a cautious threshold and a large one the estimate;
- a **normalised score** in [0, 1] whose 0.5 is the threshold: ``ln FAR(s) / (2 ln FAR(t))``, clipped (0 for the
  most ordinary good part, 0.5 at the threshold, 1 from a rate of ``FAR(t)²`` on).

The tail is fitted by probability-weighted moments (Hosking and Wallis 1987), stable on the handful of points a small
folder gives, with its shape floored at 0 (an exponential tail at least): a bounded tail learnt from a few images would
claim that no good part can score beyond it. Every number is a closed form of what :meth:`to_dict` holds, so an edge
box computes the same calibrated scores from an export's sidecar (see :func:`formula`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import stats

from .errors import AnomatuneError

TAIL_SHARE = 0.1  # the top share of the scores the tail model is fitted on ...
MIN_TAIL = 5  # ... and at least this many of them
BOOTSTRAP = 1000  # resamples of the tail fit behind the threshold's bound
LOG_FLOOR = -700.0  # ln of a false-alarm rate never goes below this (exp underflows past it)


def formula() -> str:
    """The calibration in words, for an export's sidecar: what an edge box computes from the numbers."""
    return (
        "false_alarm_rate(s): below tail_start, linear interpolation of (body_scores, body_rates), "
        "constant body_rates[0] below body_scores[0]; from tail_start on, "
        "tail_rate * (1 + tail_shape * (s - tail_start) / tail_scale) ** (-1 / tail_shape) "
        "(tail_rate * exp(-(s - tail_start) / tail_scale) when tail_shape is 0). "
        "normalized(s) = clip(ln false_alarm_rate(s) / (2 ln rate_at_threshold), 0, 1): 0.5 at the threshold. "
        "A part is defective when s > threshold."
    )


def gpd_pwm(excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape ξ (floored at 0) and scale σ of a generalised Pareto fit to the excesses (rows of samples, sorted or not)
    by probability-weighted moments; vectorised over the leading axes."""
    y = np.sort(np.atleast_2d(excess), axis=-1)
    k = y.shape[-1]
    plotting = (np.arange(1, k + 1) - 0.35) / k
    a0 = y.mean(-1)
    a1 = ((1 - plotting) * y).mean(-1)
    denominator = np.maximum(a0 - 2 * a1, 1e-300)
    kappa = a0 / denominator - 2  # Hosking's k = −ξ
    shape = np.maximum(-kappa, 0.0)
    scale = np.where(shape > 0, 2 * a0 * a1 / denominator, a0)  # ξ floored at 0: the exponential's scale is the mean
    return shape, np.maximum(scale, 1e-12 * np.maximum(np.abs(a0), 1e-300))


def gpd_log_survival(excess: np.ndarray, shape: float, scale: float) -> np.ndarray:
    """ln P(Y > y) of a generalised Pareto tail (ξ ≥ 0)."""
    z = np.maximum(np.asarray(excess, dtype=np.float64), 0.0) / scale
    return -z if shape == 0 else -np.log1p(shape * z) / shape


def gpd_quantile(rate: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The excess exceeded with probability ``rate`` (ξ ≥ 0, vectorised)."""
    shape, scale = np.asarray(shape, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    safe = np.where(shape > 0, shape, 1.0)
    return np.where(shape > 0, scale / safe * (rate ** (-safe) - 1), -scale * np.log(rate))


def clopper_pearson(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of a rate seen ``count`` times in ``n``."""
    tail = (1 - level) / 2
    low = 0.0 if count == 0 else float(stats.beta.ppf(tail, count, n - count + 1))
    high = 1.0 if count == n else float(stats.beta.ppf(1 - tail, count + 1, n - count))
    return low, high


def images_for_tight(rate: float, level: float = 0.95) -> int:
    """Good images for which a rate ``rate`` seen in them has its ``level`` interval within [rate / 2, 2 rate]."""
    n = max(2, math.ceil(1 / rate))
    while n < 10**8:
        low, high = clopper_pearson(round(n * rate), n, level)
        if low >= rate / 2 and high <= 2 * rate:
            return n
        n = math.ceil(n * 1.05)
    return n


@dataclass(frozen=True)
class ScoreCalibration:
    """The false-alarm rate of any score, a threshold and a normalised score, from good images' out-of-fold scores.

    Build one with :meth:`fit`; every field is a plain number or list (``to_dict`` / ``from_dict`` for JSON).
    """

    body_scores: tuple[float, ...]  # the sorted scores up to the tail start
    body_rates: tuple[float, ...]  # their plotting positions (the empirical false-alarm rate)
    tail_start: float
    tail_rate: float  # the false-alarm rate at the tail start
    tail_shape: float
    tail_scale: float
    threshold: float
    rate_at_threshold: float  # the calibrated false-alarm rate at the threshold
    target_rate: float | None  # the rate asked for (None: the threshold was given)
    confidence: float | None
    n_images: int
    count_above: int  # good images scoring above the threshold
    interval: tuple[float, float]  # 95 % interval of the false-alarm rate at the threshold (Clopper-Pearson)
    images_for_tight: int | None  # good images that would bring that interval within a factor 2 of the target

    @classmethod
    def fit(
        cls,
        scores,
        rate: float | None = 0.01,
        *,
        confidence: float = 0.5,
        quantile: float | None = None,
        threshold: float | None = None,
        seed: int = 0,
    ) -> ScoreCalibration:
        """Calibrate on good images' out-of-fold ``scores``; the threshold is, in order of precedence, the given
        ``threshold``, the empirical ``quantile`` of the scores, or that of the false-alarm ``rate``."""
        x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if len(x) < 2 or not np.isfinite(x).all():
            what = "are not all finite" if len(x) >= 2 else f"are {len(x)}"
            raise AnomatuneError(f"the good images' out-of-fold scores {what}: a calibration needs at least 2 finite scores")
        n = len(x)
        k = min(n - 1, max(MIN_TAIL, round(TAIL_SHARE * n)))
        start = x[n - k - 1]
        rates = (n - np.arange(n)) / (n + 1)
        shape, scale = (float(v[0]) for v in gpd_pwm(x[n - k :] - start))
        tail_rate = float(rates[n - k - 1])
        body = dict(body_scores=tuple(x[: n - k].tolist()), body_rates=tuple(rates[: n - k].tolist()))
        tail = dict(tail_start=float(start), tail_rate=tail_rate, tail_shape=shape, tail_scale=scale)
        if threshold is None and quantile is not None:
            threshold = float(np.quantile(x, quantile))
        if threshold is None:
            if rate is None:
                raise AnomatuneError("a calibration needs a false-alarm rate, a quantile or a threshold")
            threshold = cls._threshold_of(x, rate, confidence, k, start, tail_rate, shape, scale, seed, body)
        target = rate if quantile is None else None
        count = int((x > threshold).sum())
        draft = cls(**body, **tail, threshold=threshold, rate_at_threshold=1.0, target_rate=target, confidence=confidence,
                    n_images=n, count_above=count, interval=clopper_pearson(count, n),
                    images_for_tight=images_for_tight(target) if target else None)  # fmt: skip
        return replace(draft, rate_at_threshold=float(draft.false_alarm_rate(threshold)))

    @staticmethod
    def _threshold_of(x, rate, confidence, k, start, tail_rate, shape, scale, seed, body) -> float:
        """The score whose false-alarm rate is ``rate``: in the body by interpolation, in the tail at the upper
        ``confidence`` bound of the tail model's quantile over a parametric bootstrap of the tail fit."""
        if rate >= tail_rate:
            return float(np.interp(rate, body["body_rates"][::-1], body["body_scores"][::-1]))
        rng = np.random.default_rng(seed)
        u = rng.random((BOOTSTRAP, k))
        draws = gpd_quantile(u, shape, scale)  # excesses drawn from the fitted tail
        shapes, scales = gpd_pwm(draws)
        bounds = gpd_quantile(rate / tail_rate, shapes, scales)
        point = float(gpd_quantile(rate / tail_rate, shape, scale))
        return float(start + max(point, float(np.quantile(bounds, confidence))))

    # -- using it ---------------------------------------------------------------------------

    def log_false_alarm_rate(self, scores) -> np.ndarray:
        """ln of the share of good parts scoring above each score."""
        s = np.asarray(scores, dtype=np.float64)
        body = np.log(np.interp(s, self.body_scores, self.body_rates))
        tail = math.log(self.tail_rate) + gpd_log_survival(s - self.tail_start, self.tail_shape, self.tail_scale)
        return np.maximum(np.where(s >= self.tail_start, tail, body), LOG_FLOOR)

    def false_alarm_rate(self, scores) -> np.ndarray:
        """The share of good parts that score above each score (the tail model beyond the data)."""
        return np.exp(self.log_false_alarm_rate(scores))

    def score_at(self, rate: float) -> float:
        """The score whose false-alarm rate is ``rate`` (the calibration's estimate, no bound)."""
        if rate >= self.tail_rate:
            return float(np.interp(rate, self.body_rates[::-1], self.body_scores[::-1]))
        return float(self.tail_start + gpd_quantile(rate / self.tail_rate, self.tail_shape, self.tail_scale))

    def normalized(self, scores) -> np.ndarray:
        """Scores in [0, 1] with 0.5 at the threshold, the same scale for every detector."""
        reference = max(math.log(self.rate_at_threshold), LOG_FLOOR)
        if reference >= 0:  # a threshold below every good score: every part is flagged
            return np.where(np.asarray(scores, dtype=np.float64) > self.threshold, 1.0, 0.5)
        return np.clip(self.log_false_alarm_rate(scores) / (2 * reference), 0.0, 1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "body_scores": list(self.body_scores), "body_rates": list(self.body_rates),
                "interval": list(self.interval)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> ScoreCalibration:
        try:
            values = {name: data[name] for name in cls.__dataclass_fields__}
        except (KeyError, TypeError) as exc:
            raise AnomatuneError(f"a score calibration lacks {exc}: refit the run") from None
        values["body_scores"], values["body_rates"] = tuple(values["body_scores"]), tuple(values["body_rates"])
        values["interval"] = tuple(values["interval"])
        return cls(**values)

    def describe(self) -> str:
        """One line: the threshold and the false-alarm rate expected at it."""
        low, high = self.interval
        target = f"target {self.target_rate:.2%}, " if self.target_rate else ""
        return (
            f"threshold {self.threshold:.4g}: {target}expected false-alarm rate {self.rate_at_threshold:.2%} "
            f"({self.count_above} of {self.n_images} good images above it; 95 % interval {low:.1%}–{high:.1%})"
        )
