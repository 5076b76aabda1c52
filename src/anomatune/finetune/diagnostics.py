"""What the fine-tuning is doing: gradient-weight distributions, feature norms, loss curves.

The supplementary's Figure 2 plots the gradient weights P(z=−|u+) of good patches and
P(z=+|u−) of negative patches before and after fine-tuning. If no negative has weight
away from 0, L_neg gives no gradient and the fine-tuning only pulls good features
together: ``anomatune finetune --dry-run`` shows this on the frozen features first.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from ..models.base import flatten_patches, in_chunks
from .loss import MixtureLoss, keep_negatives
from .negatives import patch_mask

BINS = np.linspace(0.0, 1.0, 51)
VISIBLE = 0.01  # a gradient weight above this is "non-negligible"
FEATURE_BATCH = 8  # images per feature batch of the set-up and the diagnostics


@torch.no_grad()
def patch_features(extractor, images: torch.Tensor, batch_size: int):
    """Raw (unprojected) and projected patch features of ``images``, flattened ``(N*h*w, D)``, on the CPU."""
    extractor.eval()
    device = extractor.mean.device
    raw = extractor.extract(torch.split(images, batch_size), desc="diagnostic features", raw=True)
    projected = torch.cat([extractor.project(chunk.to(device)).cpu() for chunk in torch.split(raw, batch_size)])
    return flatten_patches(raw).float(), flatten_patches(projected).float(), raw.shape[-2:]


def log_densities(guide, u: torch.Tensor, grid) -> torch.Tensor:
    """The guide's log-density of flattened patches (whole images, in order), on the CPU in float64."""
    device = guide.grid_.device
    positions = torch.arange(grid[0] * grid[1]).repeat(len(u) // (grid[0] * grid[1]))
    with torch.no_grad():
        return in_chunks(lambda x, where: guide.log_density(x.to(device), where.to(device)).cpu(), u, positions).double()


def weight_summary(
    guide,
    loss: MixtureLoss,
    extractor,
    good: torch.Tensor,
    negatives: torch.Tensor,
    negative_masks: torch.Tensor,
    filter_mode: str,
    filter_fraction: float,
    batch_neg: int,
) -> dict:
    """Gradient-weight distributions and feature statistics on fixed good and negative images.

    Only the negative patches of ``negative_masks`` count; the filter sees them in groups of
    ``batch_neg`` images, as in a training step.
    """
    good_raw, good_u, grid = patch_features(extractor, good, FEATURE_BATCH)
    neg_raw, neg_u, _ = patch_features(extractor, negatives, FEATURE_BATCH)
    inside = patch_mask(negative_masks, grid)
    step_of_patch = (torch.arange(len(negatives)) // batch_neg).repeat_interleave(grid[0] * grid[1])[inside]
    neg_raw = neg_raw[inside]
    ld_good, ld_neg = log_densities(guide, good_u, grid), log_densities(guide, neg_u, grid)[inside]
    w_pos = 1 - loss.p_inside(ld_good)  # P(z=−|u+)
    w_neg = loss.p_inside(ld_neg)  # P(z=+|u−)
    kept = torch.cat(
        [
            torch.nonzero(step_of_patch == k).flatten()[
                keep_negatives(ld_neg[step_of_patch == k], loss, filter_mode, filter_fraction)
            ]
            for k in step_of_patch.unique()
        ]
        + [torch.zeros(0, dtype=torch.long)]
    )
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


def summary_text(summary: dict) -> str:
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


def weight_figure(start: dict, end: dict | None, title: str = "") -> Figure:
    """The supplementary's Figure 2: gradient-weight histograms at the start (and end) of fine-tuning."""
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    centres = 0.5 * (BINS[1:] + BINS[:-1])
    for ax, key, label in zip(
        axes, ("positive_histogram", "negative_histogram"), ("P(z=−|u+), good patches", "P(z=+|u−), negative patches")
    ):
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
    return fig


def loss_figure(history: list[dict], validation: list[dict] | None = None) -> Figure:
    """Loss terms and mean gradient weights per step, and the validation scores at the checkpoints."""
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(13.5 if validation else 9, 3.4))
    axes = fig.subplots(1, 3 if validation else 2)
    for key in ("loss", "loss_pos", "loss_neg"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    for key in ("p_pos_misclassified", "p_neg_inside", "p_kept_inside"):
        axes[1].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_yscale("log")
    if validation:
        for key in ("score", "aupro"):
            axes[2].plot([v["step"] for v in validation], [v[key] for v in validation], marker="o", label=f"validation {key}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    return fig
