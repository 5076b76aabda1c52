"""PatchCore: nearest-neighbour distance to a greedy coreset of training patches; as a guide, a soft k-NN density."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..data.datasets import RowSample, row_keys
from ..errors import AnomatuneError
from .base import Detector, flatten_patches
from .settings import PatchCoreSettings


def greedy_coreset(x: torch.Tensor, n: int, proj_dim: int, seed: int, chosen: int = 0) -> torch.Tensor:
    """Indices of ``n`` rows of ``x`` chosen by greedy k-center selection; with ``chosen``, the first ``chosen`` rows
    are centres already (a bank to extend) and the ``n`` new ones are picked among the others.

    Distances for the selection are computed after a Gaussian random projection to
    ``proj_dim`` dimensions (Johnson–Lindenstrauss), as in the PatchCore paper. Each
    step reads every projected patch once, so the loop is bound by memory bandwidth:
    the projected patches are kept in float16 (scaled to norms <= 1, so no product
    overflows), which halves what each step reads; the running distances stay float32.
    Rounding moves a distance by about 1e-3 of the largest, far less than the projection's
    own distortion (``benchmarks/results/speed.md`` measures the effect on the metrics).
    """
    generator = torch.Generator().manual_seed(seed)
    if x.shape[1] > proj_dim:
        x = x @ (torch.randn(x.shape[1], proj_dim, generator=generator) / proj_dim**0.5).to(x)
    x = (x / torch.linalg.vector_norm(x, dim=1).max().clamp_min(1e-30)).to(torch.float16)
    sq_norms = (x.float() ** 2).sum(1)

    def distances_to(i: int) -> torch.Tensor:  # |x|² − 2 x·c + |c|²: one matrix-vector product, no N x D temporary
        return sq_norms - 2 * (x @ x[i]).float() + sq_norms[i]

    if chosen:
        min_dist = torch.cat([squared_distances(part.float(), x[:chosen].float()).min(1).values for part in torch.split(x, 2048)])
        min_dist[:chosen] = -1.0  # never chosen again
        selected, steps = [], n
    else:
        first = int(torch.randint(len(x), (1,), generator=generator))
        selected, steps, min_dist = [first], n - 1, distances_to(first)
    for _ in tqdm(range(steps), desc="coreset", leave=False, mininterval=1.0):
        idx = int(torch.argmax(min_dist))
        selected.append(idx)
        min_dist = torch.minimum(min_dist, distances_to(idx))
    return torch.tensor(selected)


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖q − b‖² of every query and bank row, as |q|² − 2 q·b + |b|² (one matrix product; ``bank_sq``: |b|² if known)."""
    bank_sq = (bank**2).sum(1) if bank_sq is None else bank_sq
    return (queries**2).sum(1, keepdim=True) - 2 * queries @ bank.T + bank_sq


def nearest(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    chunk: int = 2048,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest bank rows of every query, in chunks (bounded memory).

    ``exclude``: a group per query and per bank row; a query never finds a bank row of its own group."""
    dists, idxs = [], []
    bank_sq = (bank**2).sum(1)
    starts = [0] if torch.jit.is_tracing() else range(0, len(queries), chunk)
    for start in starts:  # one piece while traced for export: a traced loop would freeze the batch size
        q = queries if torch.jit.is_tracing() else queries[start : start + chunk]
        d2 = squared_distances(q, bank, bank_sq)
        if exclude is not None:
            query_groups, bank_groups = exclude
            d2 = d2.masked_fill(query_groups[start : start + len(q), None] == bank_groups[None, :], float("inf"))
        d, i = torch.topk(d2, k, dim=1, largest=False)
        dists.append(d.clamp_min(0).sqrt())
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


BANDWIDTH_ROWS = 1024  # bank rows whose nearest-neighbour distances set the soft k-NN bandwidth


class PatchCore(Detector):
    """PatchCore (Roth et al., CVPR 2022): patch score = distance to the nearest coreset patch.

    Settings: :class:`PatchCoreSettings`. Fitted: ``memory_bank_`` (M, D). It is also a
    :class:`~anomatune.models.base.DensityModel`, so it can guide the fine-tuning towards
    what it measures: a soft k-NN density on its bank (see :meth:`log_density`).
    """

    Settings = PatchCoreSettings
    state = ("memory_bank", "bank_keys", "bank_rows", "sample_keys", "n_seen")

    def _sample(self, total: int, offset: int = 0) -> RowSample:
        """The seeded sample of at most ``max_patches`` of the ``total`` training patches (rows ``offset`` … of all
        the patches the bank has seen)."""
        return RowSample(total, self.settings.max_patches, self.settings.seed, offset)

    def _coreset(self, patches: torch.Tensor) -> torch.Tensor:
        """Indices of the coreset of ``patches`` (all of them at ``coreset_ratio`` 1)."""
        s = self.settings
        n = max(1, int(len(patches) * s.coreset_ratio))
        return torch.arange(len(patches)) if n >= len(patches) else greedy_coreset(patches, n, s.proj_dim, s.seed)

    def _select(self, patches: torch.Tensor, sample: RowSample, total: int) -> None:
        chosen = self._coreset(patches)
        self.memory_bank_ = patches[chosen].float().contiguous()
        self.bank_keys_, self.bank_rows_, self.sample_keys_ = sample.keys[chosen], sample.rows[chosen], sample.keys
        self.n_seen_ = torch.tensor(total)

    @torch.no_grad()
    def _fit(self, features: torch.Tensor, **options) -> None:
        patches = flatten_patches(features)
        sample = self._sample(len(patches))
        self._select(sample.take(patches), sample, len(patches))

    @torch.no_grad()
    def fit_batches(self, batches: Iterable[torch.Tensor], n_images: int) -> PatchCore:
        """Fit while the features stream in, keeping only the ``max_patches`` sample: memory is
        bounded whatever the number of images (``benchmarks/scaling.py`` measures it)."""
        kept, sample, features = [], None, None
        for features in batches:
            self._check_features(features)
            total = n_images * features.shape[2] * features.shape[3]
            sample = sample or self._sample(total)
            kept.append(sample.take(flatten_patches(features)))
        if features is None:
            raise AnomatuneError("no features to fit on")
        self._reset()
        self._select(torch.cat(kept), sample, total)
        self._record_shape(features)
        return self

    @torch.no_grad()
    def _partial_fit(self, features: torch.Tensor, n_before: int, settings) -> None:
        """The new patches are sampled as a streamed fit over the old and new images would sample them: every patch
        has a seeded key, and the sample is the ``max_patches`` smallest keys of all (the old sample's keys are kept).
        At ``coreset_ratio`` 1 the bank is that sample, so it is the streamed fit's exactly: old patches whose key
        leaves the sample go. Below 1 the bank's centres stay (they still stand for the old images) and the greedy
        k-center selection continues from them over the new sampled patches, ``coreset_ratio`` of them."""
        bank = self.memory_bank_
        new = flatten_patches(features).float().to(bank.device)
        start = int(self.n_seen_)
        new_keys = row_keys(self.settings.seed, start, len(new))
        keys = torch.cat([self.sample_keys_, new_keys])
        cap = self.settings.max_patches
        bound = keys.kthvalue(cap).values if cap is not None and len(keys) > cap else torch.tensor(float("inf"))
        joining = new_keys <= bound
        candidates, candidate_keys = new[joining.to(bank.device)], new_keys[joining]
        candidate_rows = torch.arange(start, start + len(new))[joining]
        s = self.settings
        bank_keys, bank_rows = self.bank_keys_, self.bank_rows_
        if s.coreset_ratio >= 1:
            staying = bank_keys <= bound
            bank, bank_keys, bank_rows = bank[staying.to(bank.device)], bank_keys[staying], bank_rows[staying]
            added = torch.arange(len(candidates))
        else:
            n = int(len(candidates) * s.coreset_ratio)
            pool = torch.cat([bank, candidates])
            added = greedy_coreset(pool, n, s.proj_dim, s.seed, chosen=len(bank)) - len(bank) if n else torch.zeros(0).long()
        self.memory_bank_ = torch.cat([bank, candidates[added.to(bank.device)]]).contiguous()
        self.bank_keys_ = torch.cat([bank_keys, candidate_keys[added]])
        self.bank_rows_ = torch.cat([bank_rows, candidate_rows[added]])
        self.sample_keys_ = keys[keys <= bound]
        self.n_seen_ = torch.tensor(start + len(new))

    def _nearest_patches(self, features: torch.Tensor, owners: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance (B, h, w) and index (B, h*w) of every patch's nearest bank patch (with ``owners``, an image index
        per row of ``features``: never a bank patch of the same image)."""
        b, _, h, w = features.shape
        exclude = None if owners is None else (owners.repeat_interleave(h * w), self._bank_images())
        dist, idx = nearest(flatten_patches(features).float(), self.memory_bank_, exclude=exclude)
        return dist.view(b, h, w), idx.view(b, h * w)

    def _bank_images(self) -> torch.Tensor:
        """The index of the image (in the order fitted on, updates after) each bank patch comes from."""
        h, w = self.grid_.tolist()
        return (self.bank_rows_ // (h * w)).to(self.memory_bank_.device)

    @torch.no_grad()
    def _patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self._nearest_patches(features)[0]

    @torch.no_grad()
    def bandwidth(self) -> float:
        """The soft k-NN kernel's width h: the median distance of (the first rows of) the bank to their nearest other
        bank patch, the scale at which the bank is dense. A function of the bank alone, so a resumed guide agrees."""
        bank = self.memory_bank_
        if len(bank) < 2:
            return 1.0
        dist, _ = nearest(bank[:BANDWIDTH_ROWS], bank, k=2)
        return max(dist[:, 1].median().item(), 1e-6)

    def log_density(self, u: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """log (1/M) Σ_j exp(−‖u − m_j‖² / 2h²) over the bank's M patches: a smooth nearest-neighbour distance
        (−d²/2h² for the nearest when h is small), differentiable in ``u``; ``positions`` are not used."""
        self.check_is_fitted()
        bank = self.memory_bank_.to(u.dtype)
        h = self.bandwidth()
        d2 = squared_distances(u, bank).clamp_min(0)
        return torch.logsumexp(-d2 / (2 * h**2), dim=1) - math.log(len(bank))

    @torch.no_grad()
    def online_update(self, u: torch.Tensor, positions: torch.Tensor | None, decay: float) -> None:
        """Each bank patch that is the nearest of some of the patches ``u`` moves towards their mean by ``1 − decay``
        (an online k-means step); the others stay."""
        self.check_is_fitted()
        bank = self.memory_bank_
        _, idx = nearest(u.detach().float(), bank)
        idx = idx[:, 0]
        counts = torch.bincount(idx, minlength=len(bank)).float()
        sums = torch.zeros_like(bank).index_add_(0, idx, u.detach().float())
        seen = counts > 0
        bank[seen] += (1 - decay) * (sums[seen] / counts[seen, None] - bank[seen])

    @torch.no_grad()
    def held_out_detect(self, features: torch.Tensor, folds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image fitted on (``features``, in the fit's order) scored with its own patches left out of the bank:
        each image is its own fold (``folds`` is not used), exactly a bank built without it at ``coreset_ratio`` 1,
        for the cost of scoring the training images once."""
        self._check_input(features)
        owners = torch.arange(len(features), device=self.memory_bank_.device)
        maps, scores = zip(
            *(self._detect(part, owned) for part, owned in zip(torch.split(features, 16), torch.split(owners, 16)))
        )
        return torch.cat(maps), torch.cat(scores)

    @torch.no_grad()
    def detect(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch maps as for every detector; image scores by the paper's reweighting: the most
        anomalous patch's distance, scaled by how isolated its nearest bank patch is among
        that patch's own neighbours. One nearest-neighbour search serves both."""
        self._check_input(features)
        return self._detect(features)

    def _detect(self, features: torch.Tensor, owners: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`detect`, with ``owners`` (an image index per row) leaving each image's own bank patches out."""
        dist, idx = self._nearest_patches(features, owners)
        bank = self.memory_bank_
        patches = flatten_patches(features).float().view(features.shape[0], -1, bank.shape[1])  # (B, P, D)
        flat = dist.flatten(1)
        worst = flat.argmax(1)
        rows = torch.arange(features.shape[0])
        score, anchor = flat[rows, worst], idx[rows, worst]
        exclude = None if owners is None else (owners, self._bank_images())
        _, support = nearest(bank[anchor], bank, k=min(self.settings.num_neighbors, len(bank)), exclude=exclude)  # anchor first
        d_support = torch.linalg.vector_norm(patches[rows, worst][:, None] - bank[support], dim=-1)
        weight = 1 - torch.softmax(d_support, dim=1)[:, 0]
        return dist, weight * score
