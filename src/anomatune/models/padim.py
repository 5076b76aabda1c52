"""PaDiM: one Gaussian per grid position, scored by the Mahalanobis distance."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import AnomatuneError
from .base import Detector
from .gmm import half_log_det_precision, precision_cholesky
from .settings import PaDiMSettings


class PaDiM(Detector):
    """One Gaussian per position (x, y): score = Mahalanobis distance to it. Settings: :class:`PaDiMSettings`.

    Fitted: ``means_`` (h*w, D, float64), ``prec_chol_`` (h*w, D, D), and the sums they come from,
    ``count_`` (images) and ``scatter_`` (h*w, D, D, float64: Σ (u − μ)(u − μ)ᵀ), so that
    :meth:`partial_fit` equals a fit on all the images; ``online_update`` keeps the running
    moments ``s1_``, ``s2_`` of each position. The precision is derived from the sums at load,
    not saved, and the scatter is saved as its upper triangle: a version stores a quarter of
    what the two full matrices took.
    """

    Settings = PaDiMSettings
    state = ("means", "count", "scatter")
    online_state = ("s1", "s2")
    derived = ("prec_chol",)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors, the scatter as its upper triangle (it is symmetric: half the bytes)."""
        state = super().state_dict()
        rows, cols = torch.triu_indices(*state["scatter"].shape[1:])
        state["scatter"] = state["scatter"][:, rows, cols].contiguous()
        return state

    def _derive(self) -> None:
        if self.scatter_.dim() == 2:  # saved as its upper triangle
            packed, d = self.scatter_, self.means_.shape[1]
            rows, cols = torch.triu_indices(d, d)
            self.scatter_ = packed.new_zeros(len(packed), d, d)
            self.scatter_[:, rows, cols] = packed
            self.scatter_[:, cols, rows] = packed
        if hasattr(self, "s1_"):
            self._set_online_precision()
        else:
            self._set_gaussians(float(self.count_), self.means_, self.scatter_)

    @torch.no_grad()
    def _fit(self, features: torch.Tensor, **options) -> None:
        self._set_gaussians(*self._moments(torch.split(features, 16))[:3])

    @torch.no_grad()
    def fit_batches(self, batches: Iterable[torch.Tensor], n_images: int) -> PaDiM:
        """Fit while the features stream in: each position's running sums, never every feature
        (memory: h*w x D x D float64, whatever the number of images)."""
        if self.normalized:  # the normalisation scores every training image: that needs them all
            return super().fit_batches(batches, n_images)
        self._reset()
        *moments, features = self._moments(batches)
        self._set_gaussians(*moments)
        self._record_shape(features)
        return self

    @torch.no_grad()
    def _partial_fit(self, features: torch.Tensor, n_before: int, settings) -> None:
        """Chan et al.'s pairwise update of each position's count, mean and scatter: the Gaussians of a fit on
        the old and the new images together, to float64 rounding."""
        n_b, mean_b, scatter_b, _ = self._moments(torch.split(features, 16), minimum=1)
        n_a, mean_a = float(self.count_), self.means_.double()
        n = n_a + n_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        scatter = self.scatter_ + scatter_b + (n_a * n_b / n) * delta[:, :, None] * delta[:, None, :]
        self._set_gaussians(n, mean, scatter)

    @torch.no_grad()
    def held_out_detect(self, features: torch.Tensor, folds: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Every image fitted on (``features``, in any order) scored by the Gaussians of the fit without that image:
        leave-one-out, exactly, whatever ``folds`` says. Without image i each position's scatter loses the rank-one
        term k δδᵀ (δ = u_i − μ, k = n/(n−1)), so with A = S/(n−2) + ridge·I and q = δᵀA⁻¹δ, Sherman–Morrison gives
        the Mahalanobis distance of u_i to the other images' Gaussian as k √(q / (1 − q k/(n−2))): one Cholesky
        factorisation for all the images. K folds would fit each model on (K−1)/K of the images, and with a few
        hundred images in a feature space of about as many dimensions a Gaussian's distances grow fast as images
        are taken away: the scores of unseen good images would be overstated."""
        if self.normalized:  # the normalisation's statistics need each fold's model to score the rest: refit
            return super().held_out_detect(features, folds)
        self._check_input(features)
        self._check_grid(features)
        n = float(self.count_)
        if n < 3:
            raise AnomatuneError("PaDiM's leave-one-out scores need at least 3 training images")
        d = self.means_.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=self.means_.device)
        cov = self.scatter_ / (n - 2) + self.settings.ridge * eye
        prec = torch.cat([precision_cholesky(c) for c in torch.split(cov, 64)])
        k, shrink = n / (n - 1), n / ((n - 1) * (n - 2))
        maps = []
        for chunk in torch.split(features, 16):
            b, _, h, w = chunk.shape
            diff = chunk.flatten(2).double() - self.means_.T.double()  # (B, D, P)
            q = (torch.einsum("bdp,pde->bpe", diff, prec) ** 2).sum(-1)
            maps.append((k * (q / (1 - shrink * q).clamp_min(1e-12)).sqrt()).view(b, h, w).to(features.dtype))
        return torch.cat(maps), None

    def _moments(self, batches: Iterable[torch.Tensor], minimum: int = 2) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images, each position's mean (P, D) and scatter (P, D, D) over the batches, in float64 from sums
        shifted by the first batch's mean (numerically stable); and the last batch."""
        n, shift, s1, s2, features = 0, None, 0.0, 0.0, None
        for features in batches:
            self._check_features(features)
            x = features.flatten(2).permute(2, 0, 1).double()  # (P, B, D)
            shift = x.mean(1, keepdim=True) if shift is None else shift
            centred = x - shift
            s1, s2, n = s1 + centred.sum(1), s2 + centred.transpose(1, 2) @ centred, n + len(features)
        if n < minimum:
            raise AnomatuneError(f"PaDiM needs at least {minimum} training image{'s' if minimum > 1 else ''}")
        mean = s1 / n
        return n, shift[:, 0] + mean, s2 - n * mean[:, :, None] * mean[:, None, :], features

    def _set_gaussians(self, n: float, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        d = mean.shape[1]
        eye = torch.eye(d, dtype=torch.float64, device=mean.device)
        cov = scatter / (n - 1) + self.settings.ridge * eye
        self.count_ = torch.tensor(float(n), dtype=torch.float64)
        self.means_, self.scatter_ = mean, scatter
        self.prec_chol_ = torch.cat([precision_cholesky(c).float() for c in torch.split(cov, 64)])

    @torch.no_grad()
    def online_update(self, u: torch.Tensor, positions: torch.Tensor, decay: float) -> None:
        """Online update of each position's Gaussian from patches ``u`` (N, D) at flat ``positions``.

        Per-position running moments (mean of u and of u uᵀ) decay by ``decay``; the batch's
        patches at each position take the share ``1 − decay``. Positions absent from the batch keep theirs.
        """
        self.check_is_fitted()
        x = u.detach().double()
        n_pos, d = self.means_.shape
        ridge = self.settings.ridge
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        if not hasattr(self, "s1_"):  # start from the fitted Gaussians
            prec = self.prec_chol_.double()
            cov = torch.cholesky_inverse(torch.linalg.cholesky(prec @ prec.transpose(1, 2))) - ridge * eye
            self.s1_ = self.means_.double()
            self.s2_ = cov + torch.einsum("pd,pe->pde", self.s1_, self.s1_)
        counts = torch.bincount(positions, minlength=n_pos).double()
        seen = counts > 0
        first = torch.zeros(n_pos, d, dtype=torch.float64, device=x.device).index_add_(0, positions, x)
        second = torch.zeros(n_pos, d, d, dtype=torch.float64, device=x.device).index_add_(
            0, positions, x[:, :, None] * x[:, None, :]
        )
        rate = torch.where(seen, 1 - decay, 0.0)
        self.s1_ = self.s1_ + rate[:, None] * (first / counts.clamp_min(1)[:, None] - self.s1_)
        self.s2_ = self.s2_ + rate[:, None, None] * (second / counts.clamp_min(1)[:, None, None] - self.s2_)
        self._set_online_precision()

    def _set_online_precision(self) -> None:
        eye = torch.eye(self.s1_.shape[1], dtype=torch.float64, device=self.s1_.device)
        cov = self.s2_ - torch.einsum("pd,pe->pde", self.s1_, self.s1_) + self.settings.ridge * eye
        self.means_ = self.s1_.clone()
        self.prec_chol_ = precision_cholesky(cov).float()

    def _mahalanobis_sq(self, u: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        diff = u - self.means_[positions].to(u.dtype)
        y = torch.einsum("nd,nde->ne", diff, self.prec_chol_[positions].to(u.dtype))
        return (y**2).sum(-1)

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log N(u | μ(x, y), Σ(x, y)) for patches ``u`` (N, D) at flat grid ``positions``."""
        self.check_is_fitted()
        if positions is None:
            raise AnomatuneError("PaDiM needs the grid position of every patch (positions = y * w + x)")
        log_det = half_log_det_precision(self.prec_chol_[positions].to(u.dtype))
        return -0.5 * self._mahalanobis_sq(u, positions) + log_det - 0.5 * u.shape[-1] * math.log(2 * math.pi)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        self._check_grid(features)
        b, d, h, w = features.shape
        x = features.flatten(2)  # (B, D, P)
        diff = x - self.means_.T.to(x.dtype)
        # (P, D, D) x (B, D, P) per position: Mahalanobis distance of every image's patch
        y = torch.einsum("bdp,pde->bpe", diff, self.prec_chol_.to(x.dtype))
        return (y**2).sum(-1).sqrt().view(b, h, w)
