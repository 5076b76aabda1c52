"""PaDiM: one Gaussian per grid position, scored by the Mahalanobis distance."""

from __future__ import annotations

import math

import torch

from ..errors import AnomatuneError
from .base import Detector
from .gmm import half_log_det_precision, precision_cholesky


class PaDiM(Detector):
    """One Gaussian per position (x, y): score = Mahalanobis distance to it.

    Args:
        ridge: added to every covariance's diagonal (absolute, as in the PaDiM paper: 0.01).
    """

    name = "padim"
    differentiable = True

    def __init__(self, ridge: float = 0.01, normalize: bool = False):
        super().__init__(normalize)
        self.ridge = ridge

    def config(self) -> dict:
        return super().config() | {"ridge": self.ridge}

    @torch.no_grad()
    def _fit(self, features: torch.Tensor) -> None:
        n, d, h, w = features.shape
        if n < 2:
            raise AnomatuneError("PaDiM needs at least 2 training images")
        x = features.flatten(2).permute(2, 0, 1)  # (P, N, D)
        means, precs = [], []
        eye = torch.eye(d, dtype=torch.float64, device=features.device)
        for chunk in torch.split(x, 64):
            c = chunk.double()
            mean = c.mean(1)
            centred = c - mean[:, None]
            cov = centred.transpose(1, 2) @ centred / (n - 1) + self.ridge * eye
            means.append(mean.float())
            precs.append(precision_cholesky(cov).float())
        self.state.update(means=torch.cat(means), prec_chol=torch.cat(precs))

    @torch.no_grad()
    def online_update(self, u: torch.Tensor, positions: torch.Tensor, decay: float = 0.99) -> None:
        """Online update of each position's Gaussian from patches ``u`` (N, D) at flat ``positions``.

        Per-position running moments (mean of u and of u uᵀ) decay by ``decay``; the batch's
        patches at each position take the share ``1 − decay``. Positions absent from the batch keep theirs.
        """
        self._check_fitted()
        s = self.state
        x = u.detach().double()
        n_pos, d = s["means"].shape
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        if "s1" not in s:  # start from the fitted Gaussians
            prec = s["prec_chol"].double()
            cov = torch.cholesky_inverse(torch.linalg.cholesky(prec @ prec.transpose(1, 2))) - self.ridge * eye
            s["s1"] = s["means"].double()
            s["s2"] = cov + torch.einsum("pd,pe->pde", s["s1"], s["s1"])
        counts = torch.bincount(positions, minlength=n_pos).double()
        seen = counts > 0
        first = torch.zeros(n_pos, d, dtype=torch.float64, device=x.device).index_add_(0, positions, x)
        second = torch.zeros(n_pos, d, d, dtype=torch.float64, device=x.device).index_add_(0, positions, x[:, :, None] * x[:, None, :])
        rate = torch.where(seen, 1 - decay, 0.0)
        s["s1"] = s["s1"] + rate[:, None] * (first / counts.clamp_min(1)[:, None] - s["s1"])
        s["s2"] = s["s2"] + rate[:, None, None] * (second / counts.clamp_min(1)[:, None, None] - s["s2"])
        cov = s["s2"] - torch.einsum("pd,pe->pde", s["s1"], s["s1"]) + self.ridge * eye
        s["means"] = s["s1"].float()
        s["prec_chol"] = precision_cholesky(cov).float()

    def _mahalanobis_sq(self, u: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        diff = u - self.state["means"][positions].to(u.dtype)
        y = torch.einsum("nd,nde->ne", diff, self.state["prec_chol"][positions].to(u.dtype))
        return (y**2).sum(-1)

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log N(u | μ(x, y), Σ(x, y)) for patches ``u`` (N, D) at flat grid ``positions``."""
        self._check_fitted()
        if positions is None:
            raise AnomatuneError("PaDiM needs the grid position of every patch (positions = y * w + x)")
        log_det = half_log_det_precision(self.state["prec_chol"][positions].to(u.dtype))
        return -0.5 * self._mahalanobis_sq(u, positions) + log_det - 0.5 * u.shape[-1] * math.log(2 * math.pi)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        self._check_grid(features)
        b, d, h, w = features.shape
        x = features.flatten(2)  # (B, D, P)
        diff = x - self.state["means"].T.to(x.dtype)
        # (P, D, D) x (B, D, P) per position: Mahalanobis distance of every image's patch
        y = torch.einsum("bdp,pde->bpe", diff, self.state["prec_chol"].to(x.dtype))
        return (y**2).sum(-1).sqrt().view(b, h, w)
