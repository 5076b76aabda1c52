"""Gaussian mixture on patch features, and GLAD, its per-position localisation.

Full covariances with a ridge, EM from a k-means++ start on a bounded random subsample
of training patches. Densities go through precision Cholesky factors and logsumexp (in
100+ dimensions raw densities under/overflow). ``online_update`` keeps exponentially
decayed sufficient statistics so the mixture can follow features that move during the
fine-tuning.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from ..errors import AnomatuneError
from .base import Detector, flatten_patches, in_chunks
from .settings import GLADSettings, GMMSettings, UpdateSettings

log = logging.getLogger(__name__)

WARM_START_STEPS = 5  # EM steps of a fold's refit from the whole fit's parameters (the cross-fitting)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance (drawn on the CPU,
    where ``generator`` lives, so that a fit on CUDA draws the same centres as on the CPU)."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / len(dist))
        centres.append(x[torch.multinomial(probs.float().cpu(), 1, generator=generator)].squeeze(0))
        dist = torch.minimum(dist, ((x - centres[-1]) ** 2).sum(1))
    return torch.stack(centres)


def precision_cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Upper factor P with P Pᵀ = Σ⁻¹, so that ||(u − μ) P||² is the Mahalanobis distance."""
    chol = torch.linalg.cholesky(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)


def half_log_det_precision(prec_chol: torch.Tensor) -> torch.Tensor:
    """½ log det Σ⁻¹ from the precision factor(s): the Gaussian's normalising log-term."""
    return torch.log(torch.diagonal(prec_chol, dim1=-2, dim2=-1)).sum(-1)


class GMM(Detector):
    """Gaussian mixture model: score = −log GMM(u). Settings: :class:`GMMSettings`.

    Fitted: ``weights_`` (K,), ``means_`` (K, D), ``covariances_`` (K, D, D) with the ridge,
    ``prec_chol_`` (their precision factors), ``reg_`` (the absolute ridge), ``n_iter_``.
    ``online_update`` keeps decayed sufficient statistics ``s0_``, ``s1_``, ``s2_``
    (the zeroth, first and second moments per component).
    """

    Settings = GMMSettings
    state = ("reg", "weights", "means", "covariances", "prec_chol", "n_iter")
    online_state = ("s0", "s1", "s2")

    # -- densities ---------------------------------------------------------------------

    def component_log_normal(self, u: torch.Tensor) -> torch.Tensor:
        """log N(u | μ_k, Σ_k) for patches ``u`` (N, D) → (N, K), differentiable in u."""
        prec = self.prec_chol_.to(u.dtype)
        k, d = self.means_.shape
        y = (u @ prec.permute(1, 0, 2).reshape(d, k * d)).view(-1, k, d)
        y = y - torch.einsum("kd,kde->ke", self.means_.to(u.dtype), prec)
        # keepdim, then [..., 0]: OpenVINO mis-broadcasts the sum of a ReduceSum without kept dimensions and a (K,) constant
        return -0.5 * (y**2).sum(-1, keepdim=True)[..., 0] + half_log_det_precision(prec) - 0.5 * d * math.log(2 * math.pi)

    def component_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(u | μ_k, Σ_k) → (N, K): the joint of patch and component."""
        return self.component_log_normal(u) + torch.log(self.weights_.to(u.dtype))

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log GMM(u) for patches ``u`` (N, D); ``positions`` is ignored (the mixture is global)."""
        self.check_is_fitted()
        return torch.logsumexp(self.component_log_prob(u), dim=-1)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        positions = torch.arange(h * w, device=features.device).repeat(b)
        scores = in_chunks(lambda chunk, where: -self.log_density(chunk, where), flatten_patches(features), positions)
        return scores.view(b, h, w)

    # -- fitting -------------------------------------------------------------------------

    def _set_parameters(self, weights: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> None:
        """Store parameters (float64) with their precision factors; a non-PD covariance gets more ridge."""
        reg = self.reg_
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        for attempt in range(6):
            try:
                prec = precision_cholesky(cov + reg * (10**attempt - 1) * eye)
                break
            except torch.linalg.LinAlgError:
                continue
        else:
            raise AnomatuneError(
                "GMM covariances are not positive definite even with 1e5x the ridge: check the features for constant channels"
            )
        self.weights_, self.means_, self.covariances_, self.prec_chol_ = weights, means, cov, prec

    def _m_step(self, x: torch.Tensor, resp: torch.Tensor, generator: torch.Generator) -> None:
        """M-step on float32 patches: sums are float64, the O(N K D²) products float32 (2x faster, ample precision)."""
        n, d = x.shape
        resp = resp.double()
        nk = resp.sum(0)
        eye = torch.eye(d, dtype=torch.float64, device=x.device)
        collapsed = nk < max(2.0, 1e-3 * n)
        if collapsed.any():  # re-seed on the worst-explained patches: never a NaN
            global_log_density = torch.logsumexp(self.component_log_prob(x), 1)  # GLAD too: EM fits the global mixture
            worst = torch.argsort(global_log_density)[: int(collapsed.sum()) * 16]
            for k in torch.nonzero(collapsed).flatten().tolist():
                pick = worst[torch.randint(len(worst), (1,), generator=generator)]
                resp[:, k] = 0.0
                resp[pick, k] = 1.0
                log.debug("GMM component %d collapsed and was re-seeded", k)
            row_sums = resp.sum(1, keepdim=True)  # a patch that belonged only to a collapsed component has 0
            resp = torch.where(row_sums > 0, resp / row_sums.clamp_min(1e-300), 1.0 / resp.shape[1])
            nk = resp.sum(0)
        means = (resp.T @ x.double()) / nk[:, None]
        weights32 = resp.float()
        cov = torch.stack(
            [
                ((weights32[:, k : k + 1] * centred).T @ centred).double() / nk[k]
                for k in range(len(nk))
                for centred in [x - means[k].float()]
            ]
        )
        self._set_parameters(nk / n, means, cov + self.reg_ * eye)

    def _subsample(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = flatten_patches(features)
        if len(x) > self.settings.max_patches:
            x = x[torch.randperm(len(x), generator=generator)[: self.settings.max_patches].to(x.device)]
        return x.float()

    def _fit(self, features: torch.Tensor, start: GMM | None = None) -> torch.Tensor | None:
        """EM from a k-means++ start, or, with ``start`` (a fitted mixture), :data:`WARM_START_STEPS` EM steps from its
        parameters: how the cross-fitting refits a fold in a fraction of a fit's time."""
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed)
        x = self._subsample(features, generator)
        if len(x) < s.n_components * 2:
            raise AnomatuneError(
                f"{len(x)} training patches are too few for {s.n_components} components: "
                "add training images or lower n_components"
            )
        steps = s.max_iter
        if start is not None:
            self.reg_ = start.reg_.clone()
            self._set_parameters(start.weights_.clone(), start.means_.clone(), start.covariances_.clone())
            steps = min(steps, WARM_START_STEPS)
        else:
            self.reg_ = torch.tensor(s.ridge * x.double().var(0).mean().item(), dtype=torch.float64)
            centres = kmeans_plus_plus(x, s.n_components, generator)
            resp = torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(1), s.n_components)
            self.weights_ = torch.full((s.n_components,), 1.0 / s.n_components, dtype=torch.float64, device=x.device)
            self.means_ = centres.double()
            self.prec_chol_ = torch.eye(x.shape[1], dtype=torch.float64, device=x.device).repeat(s.n_components, 1, 1)
            self._m_step(x, resp, generator)
        previous = -math.inf
        progress = tqdm(range(steps), desc=f"EM ({self.name}, K={s.n_components})", leave=False, mininterval=1.0)
        for iteration in progress:  # noqa: B007 (read after the loop: the iterations run)
            log_prob = self.component_log_prob(x)
            log_norm = torch.logsumexp(log_prob, 1)
            mean_ll = log_norm.mean().item()
            progress.set_postfix(loglik=f"{mean_ll:.2f}", refresh=False)
            if abs(mean_ll - previous) < s.tol:
                break
            previous = mean_ll
            self._m_step(x, torch.exp(log_prob - log_norm[:, None]), generator)
        self.n_iter_ = torch.tensor(iteration + 1)
        return self._finish_fit(features)

    def _finish_fit(self, features: torch.Tensor) -> torch.Tensor | None:
        """Hook for subclasses that learn more from all training patches (GLAD); returns their raw scores if known."""

    def _fold_model(self, rest: torch.Tensor) -> GMM:
        """The fit less a fold: EM warm-started from this fit's parameters (GLAD's position weights and the
        normalisation's statistics learnt again from ``rest``)."""
        return type(self)(self.settings).fit(rest, start=self)

    # -- online EM -------------------------------------------------------------------------

    def _fitted_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-patch sufficient statistics (Σ r_k, Σ r_k u, Σ r_k u uᵀ, over N) of the fitted parameters."""
        d = self.means_.shape[1]
        plain = self.covariances_ - self.reg_ * torch.eye(d, dtype=self.means_.dtype, device=self.means_.device)
        s0 = self.weights_.clone()
        return s0, s0[:, None] * self.means_, s0[:, None, None] * (plain + torch.einsum("kd,ke->kde", self.means_, self.means_))

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The E-step's per-patch sufficient statistics of patches ``x`` (N, D, float64) under the current parameters."""
        n = len(x)
        resp = torch.softmax(in_chunks(self.component_log_prob, x), dim=1)
        x32, resp32 = x.float(), resp.float()  # as in the M-step: the O(N K D²) products in float32, the sums float64
        second = torch.stack([((resp32[:, k : k + 1] * x32).T @ x32).double() for k in range(resp.shape[1])])
        return resp.mean(0), (resp.T @ x) / n, second / n

    def _set_statistics(self, s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> None:
        """The M-step from sufficient statistics."""
        means = s1 / s0[:, None]
        cov = s2 / s0[:, None, None] - torch.einsum("kd,ke->kde", means, means)
        eye = torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
        self._set_parameters(s0 / s0.sum(), means, cov + self.reg_ * eye)

    @torch.no_grad()
    def online_update(self, u: torch.Tensor, positions: torch.Tensor | None, decay: float) -> None:
        """One online-EM step on patches ``u`` (N, D), detached; ``positions`` is ignored.

        Sufficient statistics (Σ r_k, Σ r_k u, Σ r_k u uᵀ, per patch) decay by ``decay`` and
        take the batch's share ``1 − decay``; the parameters are recomputed from them.
        GLAD's per-position weights stay as fitted: only the shared components move.
        """
        self.check_is_fitted()
        if not hasattr(self, "s0_"):  # start from the fitted parameters
            self.s0_, self.s1_, self.s2_ = self._fitted_statistics()
        batch = self._batch_statistics(u.detach().double())
        self.s0_, self.s1_, self.s2_ = (
            decay * old + (1 - decay) * new for old, new in zip((self.s0_, self.s1_, self.s2_), batch)
        )
        self._set_statistics(self.s0_, self.s1_, self.s2_)

    def new_weight(self, n_new: int, n_before: int, settings: UpdateSettings) -> float:
        """The share of the new images in the update: the setting, else their share of all images."""
        return settings.new_weight if settings.new_weight is not None else n_new / (n_new + n_before)

    @torch.no_grad()
    def _partial_fit(self, features: torch.Tensor, n_before: int, settings: UpdateSettings) -> None:
        """The paper's online GMM, in ``em_steps`` steps: the fit's sufficient statistics stay fixed, the new
        patches' are recomputed under the current parameters at every step, and the two are mixed by the new
        images' weight (a subsample of ``max_patches`` new patches, seeded)."""
        weight = self.new_weight(len(features), n_before, settings)
        x = self._subsample(features, torch.Generator().manual_seed(self.settings.seed)).double()
        fitted = self._fitted_statistics()
        for _ in tqdm(range(settings.em_steps), desc=f"online EM ({self.name})", leave=False, mininterval=1.0):
            batch = self._batch_statistics(x)
            self._set_statistics(*((1 - weight) * old + weight * new for old, new in zip(fitted, batch)))


class GLAD(GMM):
    """GLAD: the global mixture with per-position weights π_k(x, y). Settings: :class:`GLADSettings`.

    The weights (``position_weights_``, (h*w, K)) are the share of training patches at
    each position whose most likely component is k (a K-MLE-style hard-assignment pass),
    floored so that no component is ruled out anywhere.
    Score: −log Σ_k π_k(x, y) N(u | μ_k, Σ_k).
    """

    Settings = GLADSettings
    state = GMM.state + ("position_weights",)

    @torch.no_grad()
    def _log_normals(self, features: torch.Tensor) -> torch.Tensor:
        """log N(u | μ_k, Σ_k) of every patch, (n, h*w, K): one pass gives both the position weights and the patches'
        scores under them."""
        return in_chunks(self.component_log_normal, flatten_patches(features)).view(len(features), -1, len(self.weights_))

    def _position_shares(self, log_normals: torch.Tensor) -> torch.Tensor:
        """Per position, the share of the images whose patch there is most likely under each component (h*w, K)."""
        best = (log_normals + torch.log(self.weights_).to(log_normals.dtype)).argmax(-1)
        return torch.nn.functional.one_hot(best, self.settings.n_components).double().mean(0)

    def _scores(self, log_normals: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The patches' raw scores (n, h, w) from their log-normals, under the position weights."""
        log_weights = torch.log(self.position_weights_).to(log_normals.dtype)
        return -torch.logsumexp(log_normals + log_weights, -1).view(len(features), *features.shape[-2:])

    def _set_position_weights(self, shares: torch.Tensor) -> None:
        weights = torch.clamp(shares, min=self.settings.floor)
        self.position_weights_ = weights / weights.sum(1, keepdim=True)

    def _finish_fit(self, features: torch.Tensor) -> torch.Tensor:
        log_normals = self._log_normals(features)
        self._set_position_weights(self._position_shares(log_normals))
        return self._scores(log_normals, features)

    @torch.no_grad()
    def _partial_fit(self, features: torch.Tensor, n_before: int, settings: UpdateSettings) -> torch.Tensor:
        """The mixture's online EM, then each position's weights mixed with the new images' shares by the same weight."""
        self._check_grid(features)
        super()._partial_fit(features, n_before, settings)
        weight = self.new_weight(len(features), n_before, settings)
        log_normals = self._log_normals(features)
        self._set_position_weights((1 - weight) * self.position_weights_ + weight * self._position_shares(log_normals))
        return self._scores(log_normals, features)

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log Σ_k π_k(x, y) N(u | μ_k, Σ_k); ``positions`` are flat grid indices (y*w + x), one per patch."""
        self.check_is_fitted()
        if positions is None:
            raise AnomatuneError("GLAD needs the grid position of every patch (positions = y * w + x)")
        log_weights = torch.log(self.position_weights_[positions].to(u.dtype))
        return torch.logsumexp(self.component_log_normal(u) + log_weights, dim=-1)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        self._check_grid(features)
        return super()._patch_scores(features)
