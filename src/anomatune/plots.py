"""Figures a person would rather look at than read: ROC and PRO curves, heatmap overlays."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from .metrics import image_roc, pro_curve  # noqa: E402


def save_evaluation_figures(run_dir: Path, loaded: dict, scores: np.ndarray, maps: np.ndarray, n_examples: int = 3) -> None:
    """``roc.png``, ``pro.png`` and ``heatmaps.png`` (worst-scored good, best-hidden defective images)."""
    labels, masks = loaded["labels"], loaded["masks"]
    if labels.min() != labels.max():
        fpr, tpr = image_roc(labels, scores)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="image ROC")
        fig.tight_layout()
        fig.savefig(run_dir / "roc.png", dpi=100)
        plt.close(fig)
    if masks is not None and masks.any():
        fpr, pro = pro_curve(masks, maps)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, pro)
        ax.axvline(0.3, ls=":", color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false-positive rate", ylabel="per-region overlap", title="PRO curve")
        fig.tight_layout()
        fig.savefig(run_dir / "pro.png", dpi=100)
        plt.close(fig)
    if loaded["images"] is not None:
        good = np.flatnonzero(labels == 0)
        bad = np.flatnonzero(labels == 1)
        picks = [(i, "good, high score") for i in good[np.argsort(-scores[good])][:n_examples]]
        picks += [(i, "defective, low score") for i in bad[np.argsort(scores[bad])][:n_examples]]
        save_overlays(run_dir / "heatmaps.png", loaded, scores, maps, picks)


def heat_overlay(image: np.ndarray, heat: np.ndarray, low: float, high: float, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured map (``low`` → blue, ``high`` and above → red) over an RGB uint8 image."""
    scaled = np.clip((heat - low) / max(high - low, 1e-12), 0, 1)
    colours = plt.get_cmap("jet")(scaled)[..., :3] * 255
    return ((1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colours).clip(0, 255).astype(np.uint8)


def save_gallery(run_dir: Path, loaded: dict, scores: np.ndarray, maps: np.ndarray, threshold: float, per_kind: int = 6) -> list[dict]:
    """Overlays of the worst false positives, the worst false negatives, then the clearest defects.

    Writes ``gallery/*.png`` and ``gallery.json`` (what the HTML report shows, in order).
    """
    from PIL import Image

    labels = loaded["labels"]
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picks = [(i, "false positive" if scores[i] > threshold else "good, highest score") for i in good[np.argsort(-scores[good])][:per_kind]]
    picks += [(i, "false negative" if scores[i] <= threshold else "defective, lowest score") for i in bad[np.argsort(scores[bad])][:per_kind]]
    shown = {i for i, _ in picks}
    picks += [(i, "defective, highest score") for i in bad[np.argsort(-scores[bad])] if i not in shown][:per_kind]
    folder = run_dir / "gallery"
    folder.mkdir(exist_ok=True)
    low = float(np.median(maps[good])) if len(good) else float(maps.min())
    entries = []
    for n, (i, kind) in enumerate(picks):
        image = (loaded["images"][i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        panel = np.concatenate([image, heat_overlay(image, maps[i], low, threshold)], axis=1)
        if loaded["masks"] is not None and loaded["masks"][i].any():  # ground truth as a green outline on the left
            edge = loaded["masks"][i] & ~ndimage.binary_erosion(loaded["masks"][i])
            panel[:, : image.shape[1]][edge] = (0, 255, 0)
        name = f"gallery/{n:02d}.png"
        Image.fromarray(panel).save(run_dir / name)
        entries.append({"image": name, "path": loaded["paths"][i], "label": int(labels[i]), "score": float(scores[i]), "kind": kind})
    (run_dir / "gallery.json").write_text(json.dumps({"threshold": threshold, "entries": entries}, indent=1) + "\n")
    return entries


def save_overlays(path: Path, loaded: dict, scores: np.ndarray, maps: np.ndarray, picks: list[tuple[int, str]]) -> None:
    """One row per image: the image with its ground-truth contour, and the heatmap over it."""
    if not picks:
        return
    vmin, vmax = np.percentile(maps, 1), np.percentile(maps, 99.9)
    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 3 * len(picks)), squeeze=False)
    for row, (i, caption) in zip(axes, picks):
        image = loaded["images"][i].permute(1, 2, 0).numpy()
        for ax in row:
            ax.imshow(image)
            ax.axis("off")
            if loaded["masks"] is not None and loaded["masks"][i].any():
                ax.contour(loaded["masks"][i], levels=[0.5], colors="lime", linewidths=1)
        row[1].imshow(maps[i], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        row[0].set_title(f"{Path(loaded['paths'][i]).parent.name}/{Path(loaded['paths'][i]).name}", fontsize=8)
        row[1].set_title(f"{caption}: {scores[i]:.3g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
