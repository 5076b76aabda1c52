"""MVTec AD metrics: image AUROC, pixel AUROC and AUPRO up to a false-positive rate of 0.3.

AUPRO follows MVTec's own evaluation code: ground-truth regions are 8-connected
components; at each threshold the per-region overlap is averaged over all regions of
the test set and the false-positive rate is taken over all defect-free pixels; the
area under the PRO curve up to FPR 0.3 is divided by 0.3. Every metric depends on the
scores' order only, so any strictly increasing transform leaves it unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

log = logging.getLogger(__name__)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        log.warning("image AUROC needs both good and defective test images: skipped")
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray | None, maps: np.ndarray) -> float:
    if masks is None:
        log.warning("no ground-truth masks: pixel AUROC skipped")
        return float("nan")
    truth = np.asarray(masks).ravel().astype(bool)
    if truth.all() or not truth.any():
        log.warning("pixel AUROC needs both defective and defect-free pixels: skipped")
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(maps).ravel()))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rates and per-region overlaps at every distinct threshold (descending).

    Each defect-free pixel adds 1/#defect-free to the FPR when the threshold passes its
    score; each pixel of region r adds 1/(|r| · #regions) to the mean overlap.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    fp_change = np.zeros(maps.shape, dtype=np.float64)
    pro_change = np.zeros(maps.shape, dtype=np.float64)
    n_ok = (~masks).sum()
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=structure)
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    fp_change[~masks] = 1.0 / max(n_ok, 1)
    for i, region in regions:
        pro_change[i][region] = 1.0 / (region.sum() * len(regions))
    order = np.argsort(maps.ravel(), kind="mergesort")[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order])
    pro = np.cumsum(pro_change.ravel()[order])
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # ties move together
    fpr, pro = np.r_[0.0, fpr[last_of_each]], np.r_[0.0, pro[last_of_each]]
    return np.clip(fpr, 0, 1), np.clip(pro, 0, 1)


def area_under(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) from 0 to x_max, interpolating y at x_max."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        y_end = np.interp(x_max, x, y)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_end]
    return float(np.trapezoid(ys, xs))


def aupro(masks: np.ndarray | None, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``."""
    if masks is None:
        log.warning("no ground-truth masks: AUPRO skipped")
        return float("nan")
    if not np.asarray(masks).any():
        log.warning("no defective pixels in the ground truth: AUPRO skipped")
        return float("nan")
    fpr, pro = pro_curve(masks, maps)
    return area_under(fpr, pro, fpr_limit) / fpr_limit


def evaluate_scores(labels, image_scores, masks, maps, fpr_limit: float = 0.3) -> dict[str, float]:
    """The three MVTec metrics in one dict."""
    return {
        "image_auroc": image_auroc(labels, image_scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, fpr_limit),
    }


def image_roc(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


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
