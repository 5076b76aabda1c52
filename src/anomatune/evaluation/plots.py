"""Figures a person would rather look at than read: ROC and PRO curves, heatmap overlays, a gallery.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no global backend), written
by the caller through its run folder.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from ..metrics import PixelCurves, image_roc


def roc_figure(labels: np.ndarray, scores: np.ndarray) -> Figure | None:
    """The image-level ROC curve; ``None`` when the test set has one class only."""
    if labels.min() == labels.max():
        return None
    fpr, tpr = image_roc(labels, scores)
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="image ROC")
    fig.tight_layout()
    return fig


def pro_figure(curves: PixelCurves | None) -> Figure | None:
    """The per-region overlap curve, with the FPR limit of AUPRO; ``None`` without pixel curves."""
    if curves is None:
        return None
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.plot(curves.fpr, curves.pro)
    ax.axvline(0.3, ls=":", color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false-positive rate", ylabel="per-region overlap", title="PRO curve")
    fig.tight_layout()
    return fig


def _as_rgb8(image) -> np.ndarray:
    """A (3, H, W) tensor in [0, 1] as an (H, W, 3) uint8 array."""
    return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def heatmaps_figure(evaluation, n_examples: int = 3) -> Figure | None:
    """One row per image: the highest-scored good images and the lowest-scored defective ones,
    each with its ground-truth contour and the heatmap over it."""
    labels, scores, maps, masks = evaluation.labels, evaluation.scores, evaluation.maps, evaluation.masks
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picks = [(i, "good, high score") for i in good[np.argsort(-scores[good])][:n_examples]]
    picks += [(i, "defective, low score") for i in bad[np.argsort(scores[bad])][:n_examples]]
    if not picks or evaluation.images is None:
        return None
    vmin, vmax = np.percentile(maps, 1), np.percentile(maps, 99.9)
    fig = Figure(figsize=(6, 3 * len(picks)))
    axes = fig.subplots(len(picks), 2, squeeze=False)
    for row, (i, caption) in zip(axes, picks):
        image = _as_rgb8(evaluation.images[i])
        for ax in row:
            ax.imshow(image)
            ax.axis("off")
            if masks is not None and masks[i].any():
                ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
        row[1].imshow(maps[i], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        path = Path(evaluation.paths[i])
        row[0].set_title(f"{path.parent.name}/{path.name}", fontsize=8)
        row[1].set_title(f"{caption}: {scores[i]:.3g}", fontsize=8)
    fig.tight_layout()
    return fig


BAND_PIXELS = 2**18  # pixels an overlay is drawn in at a time: a few MB of temporaries


@cache
def _jet() -> np.ndarray:
    """The jet colour map's 256 colours as uint8 RGB."""
    return np.rint(colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, low: float, high: float, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured map (``low`` → blue, ``high`` and above → red) over an RGB uint8 image.

    Drawn in integers (matplotlib's 256 colours, alpha in 1/256ths), a band of about
    ``BAND_PIXELS`` at a time: besides the image and the map it needs the overlay's own
    bytes and a few megabytes, so a large image costs a small multiple of its own size.
    """
    image = np.asarray(image, dtype=np.uint8)
    out = np.empty_like(image)
    scale, weight = 256 / max(high - low, 1e-12), round(alpha * 256)
    band = max(1, BAND_PIXELS // max(image.shape[1], 1))
    for start in range(0, len(image), band):
        rows = slice(start, start + band)
        index = np.clip((heat[rows] - low) * scale, 0, 255).astype(np.uint8)  # matplotlib's floor(x * 256), clipped
        blended = (256 - weight) * image[rows].astype(np.uint16) + weight * _jet()[index].astype(np.uint16)
        out[rows] = blended >> 8
    return out


def gallery(evaluation, threshold: float, per_kind: int = 6) -> list[tuple[Image.Image, dict]]:
    """Panels (image | overlay) of the worst false positives, the worst false negatives, then the clearest defects.

    Each comes with its entry for the report: path, label, score and kind. The ground
    truth is outlined in green on the left.
    """
    labels, scores, maps, masks = evaluation.labels, evaluation.scores, evaluation.maps, evaluation.masks
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picks = [
        (i, "false positive" if scores[i] > threshold else "good, highest score")
        for i in good[np.argsort(-scores[good])][:per_kind]
    ]
    picks += [
        (i, "false negative" if scores[i] <= threshold else "defective, lowest score")
        for i in bad[np.argsort(scores[bad])][:per_kind]
    ]
    shown = {i for i, _ in picks}
    picks += [(i, "defective, highest score") for i in bad[np.argsort(-scores[bad])] if i not in shown][:per_kind]
    low = float(np.median(maps[good])) if len(good) else float(maps.min())
    panels = []
    for i, kind in picks:
        image = _as_rgb8(evaluation.images[i])
        panel = np.concatenate([image, heat_overlay(image, maps[i], low, threshold)], axis=1)
        if masks is not None and masks[i].any():
            edge = masks[i] & ~ndimage.binary_erosion(masks[i])
            panel[:, : image.shape[1]][edge] = (0, 255, 0)
        entry = {"path": evaluation.paths[i], "label": int(labels[i]), "score": float(scores[i]), "kind": kind}
        panels.append((Image.fromarray(panel), entry))
    return panels
