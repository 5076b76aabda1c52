"""Drift you can see: each served model's recent scores against the scores it was calibrated on.

Over a sliding window of the last ``drift_window`` images scored, a :class:`DriftMonitor`
keeps the share above the threshold, score quantiles and the two-sample Kolmogorov–Smirnov
statistic against the calibration scores (the held-out good images the threshold was
learnt on, ``calibration.json``). A line on the line's images that drifts from those (a new
batch of material, an ageing lamp) raises the statistic before the alarms pile up; a warning
is logged when it crosses ``drift_bound`` (once, until it falls back under it).
:class:`MetricsCollector` serves every monitor at ``/metrics`` in the Prometheus text format,
read at scrape time from an app-local registry (no global state).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.9, 0.99)
MIN_DRIFT_SCORES = 30  # a window with fewer scores says nothing of drift yet


def ks_statistic(sample: Sequence[float], reference: Sequence[float]) -> float:
    """sup |F_sample − F_reference| of the two empirical distribution functions (0 identical, 1 disjoint)."""
    a, b = np.sort(np.asarray(sample, dtype=np.float64)), np.sort(np.asarray(reference, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    points = np.concatenate([a, b])
    gap = np.searchsorted(a, points, side="right") / len(a) - np.searchsorted(b, points, side="right") / len(b)
    return float(np.abs(gap).max())


class DriftMonitor:
    """The recent scores of one model (thread-safe): window statistics and the drift statistic."""

    def __init__(
        self,
        model: str,
        calibration: Sequence[float],
        threshold: float,
        window: int,
        bound: float,
        normalize: Callable[[np.ndarray], np.ndarray] | None = None,
        expected_rate: float | None = None,
    ):
        """``normalize``: the run's calibrated score (0.5 at the threshold), whose quantiles are reported beside the
        raw scores'; ``expected_rate``: the false-alarm rate expected at the threshold, to read the alarm share by."""
        self.model, self.threshold, self.bound = model, threshold, bound
        self.normalize, self.expected_rate = normalize, expected_rate
        self.calibration = np.asarray(calibration, dtype=np.float64)
        self.scores: deque[float] = deque(maxlen=window)
        self.seen = 0
        self.alerting = False
        self._lock = threading.Lock()

    def add(self, scores: Iterable[float]) -> None:
        with self._lock:
            for score in scores:
                self.scores.append(float(score))
                self.seen += 1
            stats = self._stats()
        drifted = stats["drift"] is not None and stats["drift"] > self.bound
        if drifted and not self.alerting:
            log.warning(
                "%s: the last %d scores drift from the calibration scores (KS %.3f > --drift-bound %g): check the "
                "line (material, light) or update the model with new good images",
                self.model,
                stats["window"],
                stats["drift"],
                self.bound,
            )
        self.alerting = drifted

    def _stats(self) -> dict:
        window = np.asarray(self.scores, dtype=np.float64)
        enough = len(window) >= MIN_DRIFT_SCORES and len(self.calibration) > 0
        return {
            "window": len(window),
            "scored": self.seen,
            "alarm_share": float((window > self.threshold).mean()) if len(window) else None,
            "quantiles": {str(q): float(np.quantile(window, q)) for q in QUANTILES} if len(window) else None,
            "normalized_quantiles": (
                {str(q): float(v) for q, v in zip(QUANTILES, self.normalize(np.quantile(window, QUANTILES)))}
                if len(window) and self.normalize is not None
                else None
            ),
            "expected_rate": self.expected_rate,
            "drift": ks_statistic(window, self.calibration) if enough else None,
            "drift_bound": self.bound,
            "calibration_images": len(self.calibration),
        }

    def stats(self) -> dict:
        """What ``/models`` and the page show: window size, images scored, alarm share, quantiles, KS (None until
        the window holds ``MIN_DRIFT_SCORES`` scores)."""
        with self._lock:
            return self._stats()


class MetricsCollector:
    """A prometheus-client collector over the monitors that ``monitors()`` returns (the models served now)."""

    def __init__(self, monitors: Callable[[], dict[str, DriftMonitor]], counters: Callable[[], dict]):
        self.monitors, self.counters = monitors, counters

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = self.counters()
        for name in ("requests", "images", "forward_passes"):
            yield CounterMetricFamily(f"anomatune_{name}", f"{name.replace('_', ' ').capitalize()} since start.", counters[name])
        families = {
            "scored": CounterMetricFamily("anomatune_model_images", "Images scored by the model.", labels=["model"]),
            "window": GaugeMetricFamily("anomatune_window_images", "Scores in the drift window.", labels=["model"]),
            "alarm_share": GaugeMetricFamily(
                "anomatune_alarm_share", "Share of the window's images above the threshold.", labels=["model"]
            ),
            "drift": GaugeMetricFamily(
                "anomatune_drift_ks", "KS statistic of the window's scores against the calibration scores.", labels=["model"]
            ),
            "alerting": GaugeMetricFamily(
                "anomatune_drift_alert", "1 when the KS statistic is over --drift-bound.", labels=["model"]
            ),
            "expected_rate": GaugeMetricFamily(
                "anomatune_expected_false_alarm_rate",
                "Share of good parts expected above the threshold (the alarm share of a line of good parts).",
                labels=["model"],
            ),
        }
        quantiles = GaugeMetricFamily(
            "anomatune_score_quantile", "Quantiles of the window's scores.", labels=["model", "quantile"]
        )
        normalized = GaugeMetricFamily(
            "anomatune_normalized_score_quantile",
            "Quantiles of the window's normalised scores (0.5 at the threshold, the same scale for every model).",
            labels=["model", "quantile"],
        )
        for name, monitor in self.monitors().items():
            stats = monitor.stats()
            stats["alerting"] = float(monitor.alerting)
            for key, family in families.items():
                if stats[key] is not None:
                    family.add_metric([name], stats[key])
            for q, value in (stats["quantiles"] or {}).items():
                quantiles.add_metric([name, q], value)
            for q, value in (stats["normalized_quantiles"] or {}).items():
                normalized.add_metric([name, q], value)
        yield from families.values()
        yield quantiles
        yield normalized
