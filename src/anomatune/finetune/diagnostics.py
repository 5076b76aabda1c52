"""What the fine-tuning is doing: gradient-weight distributions, feature norms, loss curves.

The supplementary's Figure 2 plots the gradient weights P(z=−|u+) of good patches and
P(z=+|u−) of negative patches before and after fine-tuning. If no negative has weight
away from 0, L_neg gives no gradient and the fine-tuning only pulls good features
together: ``anomatune finetune --dry-run`` shows this on the frozen features first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.base import flatten_patches
from .loss import MixtureLoss, keep_negatives

BINS = np.linspace(0.0, 1.0, 51)
VISIBLE = 0.01  # a gradient weight above this is "non-negligible"


@torch.no_grad()
def patch_features(extractor, images: torch.Tensor, device, batch_size: int = 8):
    """Raw (unprojected) and projected patch features of ``images``, flattened ``(N*h*w, D)``, on the CPU."""
    extractor.eval()
    raw, projected = [], []
    for chunk in torch.split(images, batch_size):
        features = extractor.raw_features(chunk.to(device))
        raw.append(flatten_patches(features).float().cpu())
        projected.append(flatten_patches(extractor.project(features)).float().cpu())
    grid = features.shape[-2:]
    return torch.cat(raw), torch.cat(projected), grid


def log_densities(guide, u: torch.Tensor, grid, device) -> torch.Tensor:
    """The guide's log-density of flattened patches (whole images, in order), chunked."""
    per_image = grid[0] * grid[1]
    positions = torch.arange(per_image).repeat(len(u) // per_image)
    with torch.no_grad():
        return torch.cat([guide.log_density(u[i : i + 8192].to(device), positions[i : i + 8192].to(device)).cpu()
                          for i in range(0, len(u), 8192)]).double()


def weight_summary(guide, loss: MixtureLoss, extractor, good: torch.Tensor, negatives: torch.Tensor, negative_masks: torch.Tensor,
                   device, filter_mode: str, filter_fraction: float, batch_neg: int) -> dict:
    """Gradient-weight distributions and feature statistics on fixed good and negative images.

    Only the negative patches of ``negative_masks`` count; the filter sees them in groups of
    ``batch_neg`` images, as in a training step.
    """
    from .negatives import patch_mask

    good_raw, good_u, grid = patch_features(extractor, good, device)
    neg_raw, neg_u, _ = patch_features(extractor, negatives, device)
    inside = patch_mask(negative_masks, grid)
    step_of_patch = (torch.arange(len(negatives)) // batch_neg).repeat_interleave(grid[0] * grid[1])[inside]
    neg_raw = neg_raw[inside]
    ld_good, ld_neg = log_densities(guide, good_u, grid, device), log_densities(guide, neg_u, grid, device)[inside]
    w_pos = 1 - loss.p_inside(ld_good)  # P(z=−|u+)
    w_neg = loss.p_inside(ld_neg)  # P(z=+|u−)
    kept = torch.cat([torch.nonzero(step_of_patch == k).flatten()[keep_negatives(ld_neg[step_of_patch == k], loss, filter_mode, filter_fraction)]
                      for k in step_of_patch.unique()] + [torch.zeros(0, dtype=torch.long)])
    return {
        "median_log_density_good": ld_good.median().item(),
        "median_log_density_negative": ld_neg.median().item(),
        "boundary": float(loss.log_volume - loss.temperature * np.log((1 - loss.alpha) / loss.alpha)),
        "positive_weight_mean": w_pos.mean().item(),
        "good_outside_share": (w_pos > 0.5).double().mean().item(),
        "negative_weight_mean": w_neg.mean().item(),
        "negative_visible_share": (w_neg > VISIBLE).double().mean().item(),
        "negative_band_share": ((w_neg > VISIBLE) & (w_neg <= 0.5)).double().mean().item(),
        "kept_visible_share": (w_neg[kept] > VISIBLE).double().mean().item(),
        "kept_weight_mean": w_neg[kept].mean().item(),
        "good_feature_norm": good_raw.norm(dim=1).mean().item(),
        "negative_feature_norm": neg_raw.norm(dim=1).mean().item(),
        "good_feature_variance": good_raw.var(0).sum().item(),
        "good_negative_distance": (good_raw.mean(0) - neg_raw.mean(0)).norm().item(),
        "positive_histogram": np.histogram(w_pos.numpy(), BINS)[0].tolist(),
        "negative_histogram": np.histogram(w_neg.numpy(), BINS)[0].tolist(),
    }


def describe(summary: dict) -> str:
    """A few lines for the terminal."""
    return (
        f"log-density medians: good {summary['median_log_density_good']:.1f}, negatives {summary['median_log_density_negative']:.1f}, "
        f"boundary {summary['boundary']:.1f}\n"
        f"good patches: mean P(z=-|u+) {summary['positive_weight_mean']:.3f}, outside the boundary {summary['good_outside_share']:.3f}\n"
        f"negative patches: mean P(z=+|u-) {summary['negative_weight_mean']:.3f}, weight > {VISIBLE} {summary['negative_visible_share']:.3f}, "
        f"in ({VISIBLE}, 1/2] {summary['negative_band_share']:.3f}; kept by the filter with weight > {VISIBLE} {summary['kept_visible_share']:.3f}\n"
        f"features: good norm {summary['good_feature_norm']:.2f}, variance {summary['good_feature_variance']:.2f}, "
        f"negative norm {summary['negative_feature_norm']:.2f}, good-negative mean distance {summary['good_negative_distance']:.2f}"
    )


def save_weight_figure(start: dict, end: dict | None, out, title: str = "") -> None:
    """The supplementary's Figure 2: gradient-weight histograms at the start (and end) of fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    centres = 0.5 * (BINS[1:] + BINS[:-1])
    for ax, key, label in zip(axes, ("positive_histogram", "negative_histogram"), ("P(z=−|u+), good patches", "P(z=+|u−), negative patches")):
        for summary, name, colour in ((start, "start", "tab:red"), (end, "end", "tab:blue")):
            if summary is not None:
                counts = np.asarray(summary[key], float)
                ax.bar(centres, counts / counts.sum(), width=BINS[1] - BINS[0], alpha=0.55, color=colour, label=name)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("share of patches")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def save_loss_figure(history: list[dict], out) -> None:
    """Loss terms and mean gradient weights per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in ("loss", "loss_pos", "loss_neg"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    for key in ("p_pos_misclassified", "p_neg_inside", "p_kept_inside"):
        axes[1].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
