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
from .base import Detector, flatten_patches

log = logging.getLogger(__name__)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    dist = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / len(dist))
        centres.append(x[torch.multinomial(probs.float(), 1, generator=generator)].squeeze(0))
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
    """Gaussian mixture model: score = −log GMM(u).

    Args:
        n_components: K.
        ridge: added to every covariance's diagonal, relative to the mean feature variance.
        max_iter, tol: EM stops when the mean log-likelihood gains less than ``tol``.
        max_patches: random subsample of training patches that EM sees (bounds time and memory).
        seed: for the subsample and the k-means++ start.
        normalize: standardise scores per grid position (see ``models.base``).

    Defaults measured on transistor and magnetic_tile (``benchmarks/results/detectors.md``):
    K = 32, a ridge of 0.1 and 50k patches beat K = 16, a ridge of 1e-3 and 20k patches
    (transistor image AUROC 0.80 → 0.91 unnormalised, 0.99 normalised).
    """

    name = "gmm"
    differentiable = True

    def __init__(self, n_components: int = 32, ridge: float = 0.1, max_iter: int = 30, tol: float = 1e-2,
                 max_patches: int = 50_000, seed: int = 0, normalize: bool = True):
        super().__init__(normalize)
        self.n_components, self.ridge, self.max_iter, self.tol = n_components, ridge, max_iter, tol
        self.max_patches, self.seed = max_patches, seed

    def config(self) -> dict:
        return super().config() | dict(n_components=self.n_components, ridge=self.ridge, max_iter=self.max_iter,
                                       tol=self.tol, max_patches=self.max_patches, seed=self.seed)

    # -- densities ---------------------------------------------------------------------

    def component_log_normal(self, u: torch.Tensor) -> torch.Tensor:
        """log N(u | μ_k, Σ_k) for patches ``u`` (N, D) → (N, K), differentiable in u."""
        self._check_fitted()
        s = self.state
        prec = s["prec_chol"].to(u.dtype)
        k, d = s["means"].shape
        y = (u @ prec.permute(1, 0, 2).reshape(d, k * d)).view(-1, k, d)
        y = y - torch.einsum("kd,kde->ke", s["means"].to(u.dtype), prec)
        return -0.5 * (y**2).sum(-1) + half_log_det_precision(prec) - 0.5 * d * math.log(2 * math.pi)

    def component_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(u | μ_k, Σ_k) → (N, K): the joint of patch and component."""
        return self.component_log_normal(u) + torch.log(self.state["weights"].to(u.dtype))

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log GMM(u) for patches ``u`` (N, D); ``positions`` is ignored (the mixture is global)."""
        return torch.logsumexp(self.component_log_prob(u), dim=-1)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        positions = torch.arange(h * w, device=features.device).repeat(b)
        u = flatten_patches(features)
        scores = torch.cat([-self.log_density(u[i : i + 8192], positions[i : i + 8192]) for i in range(0, len(u), 8192)])
        return scores.view(b, h, w)

    # -- fitting -------------------------------------------------------------------------

    def _set_parameters(self, weights: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> None:
        """Store parameters (float64) with their precision factors; a non-PD covariance gets more ridge."""
        reg = self.state["reg"]
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        for attempt in range(6):
            try:
                prec = precision_cholesky(cov + reg * (10**attempt - 1) * eye)
                break
            except torch.linalg.LinAlgError:
                continue
        else:
            raise AnomatuneError("GMM covariances are not positive definite even with 1e5x the ridge: check the features for constant channels")
        self.state.update(weights=weights, means=means, covariances=cov, prec_chol=prec)

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
        cov = torch.stack([
            ((weights32[:, k : k + 1] * centred).T @ centred).double() / nk[k]
            for k in range(len(nk))
            for centred in [x - means[k].float()]
        ])
        self._set_parameters(nk / n, means, cov + self.state["reg"] * eye)

    def _subsample(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = flatten_patches(features)
        if len(x) > self.max_patches:
            x = x[torch.randperm(len(x), generator=generator)[: self.max_patches].to(x.device)]
        return x.float()

    def _fit(self, features: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        x = self._subsample(features, generator)
        if len(x) < self.n_components * 2:
            raise AnomatuneError(f"{len(x)} training patches are too few for {self.n_components} components")
        self.state["reg"] = torch.tensor(self.ridge * x.double().var(0).mean().item(), dtype=torch.float64)
        centres = kmeans_plus_plus(x, self.n_components, generator)
        resp = torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(1), self.n_components)
        self.state.update(weights=torch.full((self.n_components,), 1.0 / self.n_components, dtype=torch.float64),
                          means=centres.double(), prec_chol=torch.eye(x.shape[1], dtype=torch.float64).repeat(self.n_components, 1, 1))
        self._m_step(x, resp, generator)
        previous = -math.inf
        progress = tqdm(range(self.max_iter), desc=f"EM ({self.name}, K={self.n_components})", leave=False, mininterval=1.0)
        for iteration in progress:
            log_prob = self.component_log_prob(x)
            log_norm = torch.logsumexp(log_prob, 1)
            mean_ll = log_norm.mean().item()
            progress.set_postfix(loglik=f"{mean_ll:.2f}", refresh=False)
            if abs(mean_ll - previous) < self.tol:
                break
            previous = mean_ll
            self._m_step(x, torch.exp(log_prob - log_norm[:, None]), generator)
        self.state["n_iter"] = torch.tensor(iteration + 1)
        self._finish_fit(features)

    def _finish_fit(self, features: torch.Tensor) -> None:
        """Hook for subclasses that learn more from all training patches (GLAD)."""

    # -- online EM -------------------------------------------------------------------------

    @torch.no_grad()
    def online_update(self, u: torch.Tensor, positions: torch.Tensor | None = None, decay: float = 0.99) -> None:
        """One online-EM step on patches ``u`` (N, D), detached; ``positions`` is ignored.

        Sufficient statistics (Σ r_k, Σ r_k u, Σ r_k u uᵀ, per patch) decay by ``decay`` and
        take the batch's share ``1 − decay``; the parameters are recomputed from them.
        GLAD's per-position weights stay as fitted: only the shared components move.
        """
        self._check_fitted()
        s = self.state
        x = u.detach().double()
        n, d = x.shape
        if "s0" not in s:  # start from the fitted parameters
            plain = s["covariances"] - s["reg"] * torch.eye(d, dtype=x.dtype, device=x.device)
            s["s0"] = s["weights"].clone()
            s["s1"] = s["weights"][:, None] * s["means"]
            s["s2"] = s["weights"][:, None, None] * (plain + torch.einsum("kd,ke->kde", s["means"], s["means"]))
        resp = torch.softmax(torch.cat([self.component_log_prob(c) for c in torch.split(x, 8192)]), dim=1)
        k = resp.shape[1]
        second = ((resp[:, :, None] * x[:, None, :]).reshape(n, k * d).T @ x).view(k, d, d)
        s["s0"] = decay * s["s0"] + (1 - decay) * resp.mean(0)
        s["s1"] = decay * s["s1"] + (1 - decay) * (resp.T @ x) / n
        s["s2"] = decay * s["s2"] + (1 - decay) * second / n
        means = s["s1"] / s["s0"][:, None]
        cov = s["s2"] / s["s0"][:, None, None] - torch.einsum("kd,ke->kde", means, means)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        self._set_parameters(s["s0"] / s["s0"].sum(), means, cov + s["reg"] * eye)


class GLAD(GMM):
    """GLAD: the global mixture with per-position weights π_k(x, y).

    The weights are the share of training patches at each position whose most likely
    component is k (a K-MLE-style hard-assignment pass), floored at ``floor`` so that no
    component is ruled out anywhere. The floor is tiny because log-densities of patches
    spread over hundreds of nats: a floor of 1e-3 (−7 nats) left GLAD equal to the GMM. Score: −log Σ_k π_k(x, y) N(u | μ_k, Σ_k).
    """

    name = "glad"

    def __init__(self, n_components: int = 32, floor: float = 1e-12, **kwargs):
        super().__init__(n_components=n_components, **kwargs)
        self.floor = floor

    def config(self) -> dict:
        return super().config() | {"floor": self.floor}

    @torch.no_grad()
    def _finish_fit(self, features: torch.Tensor) -> None:
        n, _, h, w = features.shape
        u = flatten_patches(features)
        best = torch.cat([self.component_log_prob(u[i : i + 8192].double()).argmax(1) for i in range(0, len(u), 8192)])
        counts = torch.nn.functional.one_hot(best.view(n, h * w), self.n_components).double().sum(0)
        weights = torch.clamp(counts / n, min=self.floor)
        self.state["position_weights"] = weights / weights.sum(1, keepdim=True)  # (h*w, K)

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log Σ_k π_k(x, y) N(u | μ_k, Σ_k); ``positions`` are flat grid indices (y*w + x), one per patch."""
        if positions is None:
            raise AnomatuneError("GLAD needs the grid position of every patch (positions = y * w + x)")
        log_weights = torch.log(self.state["position_weights"][positions].to(u.dtype))
        return torch.logsumexp(self.component_log_normal(u) + log_weights, dim=-1)

    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        self._check_grid(features)
        return super()._patch_scores(features)
