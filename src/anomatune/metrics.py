"""MVTec AD metrics: image AUROC, pixel AUROC and AUPRO up to a false-positive rate of 0.3.

AUPRO follows MVTec's own evaluation code: ground-truth regions are 8-connected
components; at each threshold the per-region overlap is averaged over all regions of
the test set and the false-positive rate is taken over all defect-free pixels; the
area under the PRO curve up to FPR 0.3 is divided by 0.3. Every metric depends on the
scores' order only, so any strictly increasing transform leaves it unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


MAIN_METRICS = ("image_auroc", "pixel_auroc", "aupro")  # the three every table, lineage and /models shows


def ranked(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores' descending order, and the position in it of the last of each run of equal scores.

    A curve is read at those positions only: tied scores cross a threshold together.
    """
    flat = np.asarray(scores).ravel()
    order = np.argsort(flat)[::-1]  # no stable sort needed: ties are read together
    return order, np.r_[np.nonzero(np.diff(flat[order]))[0], len(flat) - 1]


def rising(weights: np.ndarray, last_of_each: np.ndarray, total: float = 1.0) -> np.ndarray:
    """A curve from 0: the running sum of ``weights`` (in score order) at each distinct threshold, over ``total``."""
    return np.clip(np.r_[0.0, np.cumsum(weights, dtype=np.float64)[last_of_each] / max(total, 1e-300)], 0, 1)


def image_roc(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (descending), from (0, 0)."""
    truth = np.asarray(labels).astype(bool).ravel()
    order, last_of_each = ranked(scores)
    return roc_in_order(truth[order], last_of_each)


def roc_in_order(in_order: np.ndarray, last_of_each: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of labels already in descending score order (see :func:`ranked`)."""
    return rising(~in_order, last_of_each, (~in_order).sum()), rising(in_order, last_of_each, in_order.sum())


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by trapezoids over the distinct thresholds (equal to scikit-learn's)."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        log.warning("image AUROC needs both good and defective test images: skipped")
        return float("nan")
    return float(np.trapezoid(*image_roc(labels, scores)[::-1]))


@dataclass(frozen=True)
class PixelCurves:
    """Pixel ROC and PRO curves at every distinct threshold (descending), from one sort of the maps.

    ``fpr``: share of defect-free pixels above the threshold (the x axis of both curves);
    ``tpr``: share of defective pixels above it; ``pro``: mean over the ground-truth
    regions (8-connected) of each region's share above it. Each starts at 0.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    pro: np.ndarray

    @classmethod
    def of(cls, masks: np.ndarray, maps: np.ndarray) -> PixelCurves:
        truth = np.asarray(masks).astype(bool)
        regions = label_regions(truth)
        sizes = np.bincount(regions.ravel())
        region_share = np.r_[0.0, 1.0 / (sizes[1:] * max(len(sizes) - 1, 1))]  # each pixel of region r adds 1/(|r| #regions)
        order, last_of_each = ranked(maps)
        fpr, tpr = roc_in_order(truth.ravel()[order], last_of_each)
        return cls(fpr=fpr, tpr=tpr, pro=rising(region_share[regions.ravel()[order]], last_of_each))


def label_regions(masks: np.ndarray) -> np.ndarray:
    """Ground-truth regions (8-connected), numbered 1.. across all masks; 0 is defect-free."""
    labelled = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        labelled[i], n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        labelled[i][mask] += offset
        offset += n
    return labelled


def pixel_curves(masks: np.ndarray | None, maps: np.ndarray) -> PixelCurves | None:
    """The curves, or None (logged) without both defective and defect-free pixels."""
    if masks is None:
        log.warning("no ground-truth masks: pixel AUROC skipped, and AUPRO")
        return None
    truth = np.asarray(masks).astype(bool)
    if truth.all() or not truth.any():
        log.warning("pixel AUROC and AUPRO need both defective and defect-free pixels: skipped")
        return None
    return PixelCurves.of(truth, maps)


def pixel_auroc(masks: np.ndarray | None, maps: np.ndarray) -> float:
    return pixel_metrics(pixel_curves(masks, maps))["pixel_auroc"]


def area_under(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) from 0 to x_max, interpolating y at x_max."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        y_end = np.interp(x_max, x, y)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_end]
    return float(np.trapezoid(ys, xs))


def pixel_metrics(curves: PixelCurves | None, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC (trapezoids over the distinct thresholds, as scikit-learn) and AUPRO; NaN without curves."""
    if curves is None:
        return {"pixel_auroc": float("nan"), "aupro": float("nan")}
    return {
        "pixel_auroc": float(np.trapezoid(curves.tpr, curves.fpr)),
        "aupro": area_under(curves.fpr, curves.pro, fpr_limit) / fpr_limit,
    }


def f1_at(labels, scores, threshold: float) -> float:
    """F1 of "defective" = score > threshold."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(scores) > threshold
    tp = np.sum(labels & predicted)
    return float(2 * tp / max(labels.sum() + predicted.sum(), 1))


def f1_optimal_threshold(labels, scores) -> tuple[float, float]:
    """The threshold with the best F1 on these labels, and that F1: tuned on test data, optimistic by construction."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.unique(scores)
    candidates = np.concatenate([[candidates[0] - 1.0], candidates])  # "everything defective" too
    f1 = [f1_at(labels, scores, t) for t in candidates]
    best = int(np.argmax(f1))
    return float(candidates[best]), float(f1[best])


def split_metrics(labels, scores, curves: PixelCurves | None, threshold: float | None = None) -> dict[str, float]:
    """The metrics of a labelled test split: image AUROC, pixel AUROC, AUPRO (NaN where they do not apply); with
    good and defective images the test-tuned F1; with a ``threshold`` the F1 at it."""
    labels = np.asarray(labels)
    metrics = {"image_auroc": image_auroc(labels, scores)} | pixel_metrics(curves)
    if labels.min() != labels.max():
        tuned, best_f1 = f1_optimal_threshold(labels, scores)
        metrics |= {"f1_threshold_tuned_on_test": tuned, "f1_tuned_on_test": best_f1}
    if threshold is not None:
        flagged = np.asarray(scores) > threshold
        metrics |= {"learnt_threshold": threshold, "f1_at_learnt_threshold": f1_at(labels, scores, threshold)}
        metrics |= {  # the decision's two errors: the share of good images flagged, of defects caught
            "false_alarm_rate_at_threshold": float(flagged[labels == 0].mean()) if (labels == 0).any() else float("nan"),
            "defects_caught_at_threshold": float(flagged[labels == 1].mean()) if labels.any() else float("nan"),
        }
        if not labels.any():
            log.warning("F1 needs defective test images: f1_at_learnt_threshold is not computed")
            metrics["f1_at_learnt_threshold"] = float("nan")
    return metrics
