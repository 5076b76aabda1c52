"""The mixture loss with an outlier class, and the outlier filter (supplementary §2).

A patch feature is a positive (density GMM(u), prior 1 − α) or a negative (uniform
density 1/L, prior α). With the log-density ratio divided by a temperature T (ours;
T = 1 is the paper), the posterior is

    P(z=+ | u) = σ(ℓ(u)),   ℓ(u) = (log GMM(u) − log L) / T + log((1 − α) / α),

so L_pos = −log P(z=+|u+) = softplus(−ℓ) and L_neg = −log P(z=−|u−) = softplus(ℓ), both
in log space. Their gradients are −h(u) P(z=−|u) / T and h(u) P(z=+|u) / T with
h = ∇ log GMM: each patch is weighted by its probability of being misclassified.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import AnomatuneError


class MixtureLoss:
    """L_pos and L_neg of patches from their log-densities under the guiding model."""

    def __init__(self, alpha: float = 0.5, log_volume: float = 0.0, temperature: float = 1.0):
        self.alpha, self.log_volume, self.temperature = alpha, log_volume, temperature

    def logit(self, log_density: torch.Tensor) -> torch.Tensor:
        """ℓ(u) = log P(z=+|u) − log P(z=−|u)."""
        return (log_density - self.log_volume) / self.temperature + math.log((1 - self.alpha) / self.alpha)

    def positive(self, log_density: torch.Tensor) -> torch.Tensor:
        """Per-patch −log P(z=+ | u+)."""
        return F.softplus(-self.logit(log_density))

    def negative(self, log_density: torch.Tensor) -> torch.Tensor:
        """Per-patch −log P(z=− | u−)."""
        return F.softplus(self.logit(log_density))

    def p_inside(self, log_density: torch.Tensor) -> torch.Tensor:
        """P(z=+ | u): a negative's gradient weight; 1 − it is a positive's."""
        return torch.sigmoid(self.logit(log_density))

    def calibrate(self, boundary: float) -> MixtureLoss:
        """Set log L so that P(z=+|u) = 1/2 where log GMM(u) = ``boundary``."""
        self.log_volume = float(boundary) + self.temperature * math.log((1 - self.alpha) / self.alpha)
        return self


def boundary_log_density(
    good: torch.Tensor, negative: torch.Tensor | None, calibration: str = "quantile", quantile: float = 0.01
) -> float:
    """The log-density where P(z=+|u) = 1/2.

    ``quantile``: that quantile of the good patches' log-densities (the paper's choice).
    ``midpoint`` (ours): halfway between the medians of the good and the negative patches.
    """
    if calibration == "quantile":
        return torch.quantile(good.double().flatten()[: 2**24], quantile).item()
    if calibration == "midpoint":
        if negative is None:
            raise AnomatuneError("calibration='midpoint' needs the negatives' log-densities")
        return 0.5 * (good.double().median().item() + negative.double().median().item())
    raise AnomatuneError(f"calibration must be 'quantile' or 'midpoint', not {calibration!r}")


AUTO_TEMPERATURE_DIVISOR = 8.0


def auto_temperature(good: torch.Tensor, negative: torch.Tensor) -> float:
    """(median good − median negative log-density) / 8: the two medians sit 4 temperatures either side of a midpoint boundary."""
    return max((good.double().median() - negative.double().median()).item() / AUTO_TEMPERATURE_DIVISOR, 1e-3)


def keep_negatives(
    log_density: torch.Tensor,
    loss: MixtureLoss,
    mode: str = "fraction",
    fraction: float = 0.1,
    population: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the negative patches whose gradient is kept (the outlier filter).

    ``fraction``: the ``fraction`` of the batch with the lowest log-density (most outside);
    ``threshold``: those with P(z=+|u) < 1/2; ``none``: all. Negatives deep inside the
    model (plain background) would otherwise carry weight ≈ 1 and cause gradient spikes.
    ``population``: the whole batch's log-densities when ``log_density`` is one process's
    share of it (torchrun): the fraction is taken of the whole batch.
    """
    ld = log_density.detach()
    if mode == "fraction" and population is not None and len(population):
        cut = torch.kthvalue(population.to(ld.device), max(1, round(fraction * len(population)))).values
        return torch.nonzero(ld <= cut).flatten()
    if len(ld) == 0:
        return torch.zeros(0, dtype=torch.long, device=ld.device)
    if mode == "fraction":
        return torch.topk(-ld, max(1, round(fraction * len(ld)))).indices
    if mode == "threshold":
        return torch.nonzero(loss.p_inside(ld) < 0.5).flatten()
    if mode == "none":
        return torch.arange(len(ld), device=ld.device)
    raise AnomatuneError(f"filter must be fraction, threshold or none, not {mode!r}")
