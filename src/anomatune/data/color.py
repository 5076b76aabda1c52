"""Colour transfer: give a natural photo the colours of a product image.

The fine-tuning's negatives are natural photos whose colours are first mapped onto a
good product image, so that colour alone cannot tell them apart (supplementary §1).
``transfer(..., method="mk")`` is the linear Monge–Kantorovich map of Pitié & Kokaram
(2007) between the two Gaussian colour models,

    T = Σs^{-1/2} (Σs^{1/2} Σt Σs^{1/2})^{1/2} Σs^{-1/2},   x' = T (x − μs) + μt,

and ``rho`` walks the Wasserstein geodesic ``x_ρ = (1 − ρ) x + ρ x'``. ``method="diagonal"``
(per-channel mean and standard deviation) is there for comparison: it keeps a colourful
photo colourful on a grey target, MK does not. Everything is batched in torch; square
roots go through symmetric eigendecompositions with clamped eigenvalues.
"""

from __future__ import annotations

import torch

from ..errors import AnomatuneError

METHODS = ("mk", "diagonal")


def color_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, 3)`` and covariance ``(B, 3, 3)`` of the pixels of ``(B, 3, H, W)`` images."""
    x = images.flatten(2).double()
    mean = x.mean(-1)
    centred = x - mean[..., None]
    return mean, centred @ centred.transpose(1, 2) / x.shape[-1]


def _sym_power(m: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    """``m ** power`` for symmetric PSD matrices, eigenvalues clamped at ``eps``."""
    values, vectors = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    return vectors @ torch.diag_embed(values.clamp_min(eps) ** power) @ vectors.transpose(-1, -2)


def mk_matrix(source_cov: torch.Tensor, target_cov: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Monge–Kantorovich linear map between two colour covariances (batched)."""
    root = _sym_power(source_cov, 0.5, eps)
    inv_root = _sym_power(source_cov, -0.5, eps)
    return inv_root @ _sym_power(root @ target_cov @ root, 0.5, 0.0) @ inv_root


def transfer(
    source: torch.Tensor, target: torch.Tensor, rho: float | torch.Tensor = 1.0, method: str = "mk", eps: float = 1e-8
) -> torch.Tensor:
    """Map the colours of ``source`` ``(B, 3, H, W)`` onto those of ``target`` ``(B, 3, H', W')``.

    ``rho`` (a number or one per image) interpolates from the source (0) to the full
    transfer (1). The output is not clipped: callers that need an image clamp to [0, 1].
    """
    if method not in METHODS:
        raise AnomatuneError(f"colour transfer method must be one of {', '.join(METHODS)}, not {method!r}")
    if source.dim() != 4 or target.dim() != 4 or source.shape[1] != 3 or target.shape[1] != 3:
        raise AnomatuneError(
            f"colour transfer takes RGB batches (B, 3, H, W), got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if len(target) not in (1, len(source)):
        raise AnomatuneError(f"{len(source)} source images but {len(target)} targets: pass one target or one per source")
    mu_s, cov_s = color_moments(source)
    mu_t, cov_t = color_moments(target)
    if method == "mk":
        matrix = mk_matrix(cov_s, cov_t, eps)
    else:
        scale = (torch.diagonal(cov_t, dim1=1, dim2=2).clamp_min(0) / torch.diagonal(cov_s, dim1=1, dim2=2).clamp_min(eps)).sqrt()
        matrix = torch.diag_embed(scale)
    x = source.flatten(2).double()
    mapped = matrix @ (x - mu_s[..., None]) + mu_t[..., None]
    rho = torch.as_tensor(rho, dtype=torch.float64, device=source.device).reshape(-1, 1, 1)
    out = (1 - rho) * x + rho * mapped
    return out.view_as(source).to(source.dtype)


def save_transfer_figure(source: torch.Tensor, target: torch.Tensor, rhos, out) -> None:
    """The supplementary's Figure 1: a row per method (diagonal, MK); source, target, then each ρ."""
    from matplotlib.figure import Figure

    rhos = list(rhos)
    fig = Figure(figsize=(2.4 * (2 + len(rhos)), 5.2))
    axes = fig.subplots(2, 2 + len(rhos), squeeze=False)
    for row, method in enumerate(("diagonal", "mk")):
        panels = [(source, "source"), (target, "target")]
        panels += [(transfer(source[None], target[None], rho, method)[0].clamp(0, 1), f"ρ = {rho:g}") for rho in rhos]
        for ax, (image, title) in zip(axes[row], panels):
            ax.imshow(image.permute(1, 2, 0).cpu().numpy())
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel({"diagonal": "diagonal", "mk": "Monge–Kantorovich"}[method])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
