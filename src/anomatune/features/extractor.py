"""Differentiable patch features: the input of every detector and of the fine-tuning.

``FeatureExtractor`` normalises a [0, 1] RGB batch with the backbone's own statistics (or ImageNet's),
takes the maps of the chosen stages, averages each position over a ``pool`` x ``pool``
neighbourhood (each stage at its own resolution with ``aggregation`` stage, zeros beyond
the border counted; the concatenation, over what lies inside, with concat), resizes them to
the finest of them (at least a stride-8 grid: 32x32 for a 256x256 input), concatenates them, applies the fine-tuned :class:`Adaptor` when
the weights hold one, and optionally applies a fixed linear
projection (``random`` or ``pca``) to ``proj_dim`` dimensions. Every step is
differentiable, so the fine-tuning can backpropagate from a detector's density into the
backbone. Stages after the last used one are dropped, and batch-norm statistics stay
frozen in training mode by default (small batches would otherwise wreck them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.datasets import RowSample
from ..errors import AnomatuneError, BackboneError
from .adaptor import Adaptor
from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone
from .settings import AUTO, CONCAT, NONE, STAGE, FeatureSettings

GRID_STRIDE = 8


def combine_stages(maps: Sequence[torch.Tensor], input_hw: tuple[int, int], pool: int, aggregation: str) -> torch.Tensor:
    """Stage maps pooled, resized to the finest of them (at least a stride-8 grid of the input) and concatenated:
    ``stage`` pools each map at its own resolution, zeros beyond the border counted; ``concat`` pools the
    concatenation over what lies inside. A function of the maps alone, so several stage sets can share one pass."""
    pooled = pool > 1
    if pooled and aggregation == STAGE:
        maps = [F.avg_pool2d(m, pool, stride=1, padding=pool // 2, count_include_pad=True) for m in maps]
    grid = (input_hw[0] // GRID_STRIDE, input_hw[1] // GRID_STRIDE)
    size = max([tuple(m.shape[-2:]) for m in maps] + [grid])
    maps = [m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
    features = torch.cat(list(maps), dim=1)
    if pooled and aggregation == CONCAT:
        features = F.avg_pool2d(features, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return features


def pca_projection(
    raw: torch.Tensor | Sequence[torch.Tensor], dim: int, max_patches: int = 200_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PCA of raw features ``(N, C, h, w)`` (one tensor or batches) to ``dim`` dimensions: ``(weight (dim, C),
    mean (C,))`` in float32, from a seeded sample of ``max_patches`` patches drawn before any copy is made."""
    batches = [raw] if isinstance(raw, torch.Tensor) else list(raw)
    channels = batches[0].shape[1]
    sample = RowSample(sum(b.shape[0] * b.shape[2] * b.shape[3] for b in batches), max_patches, seed)
    patches = torch.cat([sample.take(b.permute(0, 2, 3, 1).reshape(-1, channels)).double() for b in batches])
    if len(patches) < 2:
        raise AnomatuneError("fit_projection got too few patches: pass at least one batch of good images")
    mean = patches.mean(0)
    _, vectors = torch.linalg.eigh(torch.cov((patches - mean).T))  # ascending eigenvalues
    return vectors[:, -dim:].flip(1).T.float(), mean.float()


def project_features(features: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """A linear projection of features ``(B, C, h, w)`` to ``(B, dim, h, w)`` after centring."""
    centred = features - mean.view(1, -1, 1, 1)
    return torch.einsum("dc,bchw->bdhw", weight.to(features.dtype), centred)


class FeatureExtractor(nn.Module):
    """Patch features ``(B, D, h, w)`` of an image batch ``(B, 3, H, W)`` in [0, 1].

    Args:
        settings: :class:`FeatureSettings`, or a backbone name; keyword ``changes``
            override its fields (``layers=(2,)``, ``pool=1``, ``proj_dim=8``, ...).
            The input size is the caller's: the extractor takes any size.
        backbone: an already built :class:`Backbone` (e.g. fine-tuned weights) instead of
            the one ``settings`` names.
        seed: draws the random projection.
        freeze_batchnorm: keep batch-norm layers in eval mode even in ``train()``.
    """

    def __init__(
        self,
        settings: FeatureSettings | str | None = None,
        *,
        backbone: Backbone | None = None,
        seed: int = 0,
        freeze_batchnorm: bool = True,
        **changes,
    ):
        super().__init__()
        if isinstance(settings, str):
            settings = FeatureSettings(backbone=settings)
        settings = (settings or FeatureSettings()).updated(**changes)
        if backbone is None:
            backbone = create_backbone(settings.backbone, weights=settings.backbone_weights)
        self.settings = settings
        self.backbone_name = backbone.name
        self.weights_id = backbone.weights_id
        self.layers = tuple(sorted(backbone.layers if settings.layers is None else settings.layers))
        self.patch_size = backbone.patch_size
        self.pool = settings.pool
        self.aggregation = STAGE if settings.aggregation == STAGE else CONCAT
        self.proj = "pca" if settings.proj == AUTO else settings.proj
        self.freeze_batchnorm = freeze_batchnorm
        self.model = backbone.model
        self._check_layers()
        self.model.prune_intermediate_layers(list(self.layers), prune_norm=True, prune_head=True)
        if self.patch_size == 1:  # convolutions run 1.6x faster channels-last on the CPU (benchmarks/results/speed.md)
            self.model.to(memory_format=torch.channels_last)
        imagenet = settings.normalization == "imagenet"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN if imagenet else backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD if imagenet else backbone.std).view(1, 3, 1, 1))
        with torch.no_grad():
            probe = self.model.eval()
            self.stage_channels = tuple(m.shape[1] for m in self.stage_maps(torch.zeros(1, 3, 64, 64)))
            probe.train(self.training)
        self.raw_dim = sum(self.stage_channels)
        self.adaptor = None if backbone.adaptor is None else Adaptor.from_state(backbone.adaptor, settings.backbone_weights)
        if self.adaptor is not None and self.adaptor.dim != self.raw_dim:
            raise BackboneError(
                f"{settings.backbone_weights}: its adaptor was trained on {self.adaptor.dim}-dimensional features, "
                f"these layers give {self.raw_dim}; use the fine-tuning's layers"
            )
        proj_dim = None if settings.proj == NONE else settings.proj_dim
        if settings.proj == AUTO and proj_dim is not None and proj_dim >= self.raw_dim:
            proj_dim = None  # auto: projecting to as many dimensions as there are gains nothing
        self.proj_dim = proj_dim
        if proj_dim is not None:
            if not 0 < proj_dim <= self.raw_dim:
                raise AnomatuneError(f"proj_dim must be in 1..{self.raw_dim} for these layers, not {proj_dim}")
            generator = torch.Generator().manual_seed(seed)
            weight = torch.randn(proj_dim, self.raw_dim, generator=generator) / proj_dim**0.5
            self.register_buffer("proj_weight", weight)
            self.register_buffer("proj_mean", torch.zeros(self.raw_dim))
            self.register_buffer("proj_fitted", torch.tensor(self.proj == "random"))
        self.train(False)

    def _check_layers(self) -> None:
        n_stages = len(self.model.blocks) if self.patch_size > 1 else len(self.model.feature_info)
        bad = [i for i in self.layers if not 0 <= i < n_stages]
        if not self.layers or bad:
            if self.patch_size > 1:
                choices = f"blocks 0..{n_stages - 1}"
            else:
                choices = ", ".join(
                    f"{i} (stride {f['reduction']}, {f['num_chs']} ch)" for i, f in enumerate(self.model.feature_info)
                )
            raise BackboneError(f"layers {list(self.layers)} not available in {self.backbone_name}: choose from {choices}")

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        if self.freeze_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each chosen stage's map at its own resolution, in the order of ``layers``."""
        x = (x - self.mean) / self.std
        if self.patch_size > 1:  # transformers take sides that are multiples of the patch
            h, w = (max(self.patch_size, round(s / self.patch_size) * self.patch_size) for s in x.shape[-2:])
            if (h, w) != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.forward_intermediates(x, indices=list(self.layers), intermediates_only=True)

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated, pooled (and adapted) stage features before the projection: ``(B, raw_dim, h, w)``."""
        return self.adapt(self.stage_features(x))

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The adaptor's map (identity without one)."""
        return features if self.adaptor is None else self.adaptor(features)

    def stage_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated, pooled stage features, before any adaptor."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise AnomatuneError(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        return combine_stages(self.stage_maps(x), tuple(x.shape[-2:]), self.pool, self.aggregation)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the fixed projection (identity when ``proj_dim`` is None)."""
        if self.proj_dim is None:
            return features
        if not bool(self.proj_fitted):
            raise AnomatuneError("the PCA projection is not fitted: call fit_projection(good images) first")
        return project_features(features, self.proj_weight, self.proj_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.raw_features(x))

    @torch.no_grad()
    def stream(self, batches: Iterable, desc: str = "features", raw: bool = False, adapt: bool = True) -> Iterator[torch.Tensor]:
        """Features of each batch (image tensors or dataset dicts) in turn, on the CPU, under one progress bar.

        The one batched loop of fitting, the fine-tuning's set-up and its diagnostics;
        ``raw`` skips the projection, ``adapt=False`` (with ``raw``) the adaptor too.
        """
        device = self.mean.device
        for batch in tqdm(batches, desc=desc, leave=False):
            images = (batch["image"] if isinstance(batch, dict) else batch).to(device)
            if raw:
                features = self.raw_features(images) if adapt else self.stage_features(images)
            else:
                features = self(images)
            yield features.cpu()

    def extract(self, batches: Iterable, desc: str = "features", raw: bool = False, adapt: bool = True) -> torch.Tensor:
        """Features of every batch gathered in one tensor (see :meth:`stream`)."""
        outputs = list(self.stream(batches, desc, raw, adapt))
        if not outputs:
            raise AnomatuneError("no images to extract features from")
        return torch.cat(outputs)

    @torch.no_grad()
    def fit_projection(self, batches: Iterable, max_patches: int = 200_000, seed: int = 0) -> FeatureExtractor:
        """Fit the PCA projection once on good images (batches of tensors or dataset dicts).

        A random projection needs no data and is left as drawn. Patches are subsampled
        to ``max_patches`` so memory stays bounded on large training sets.
        """
        if self.proj_dim is None or self.proj == "random":
            return self
        was_training = self.training
        self.eval()
        self.fit_projection_on(self.extract(batches, desc="fit PCA projection", raw=True), max_patches, seed)
        self.train(was_training)
        return self

    @torch.no_grad()
    def fit_projection_on(
        self, raw: torch.Tensor | Sequence[torch.Tensor], max_patches: int = 200_000, seed: int = 0
    ) -> FeatureExtractor:
        """Fit the PCA projection on raw features ``(N, raw_dim, h, w)`` already extracted (no second pass over
        the images), as one tensor or batch by batch; the patch sample is drawn before any copy is made."""
        if self.proj_dim is None or self.proj == "random":
            return self
        weight, mean = pca_projection(raw, self.proj_dim, max_patches, seed)
        self.proj_weight.copy_(weight.to(self.proj_weight.device))
        self.proj_mean.copy_(mean.to(self.proj_mean.device))
        self.proj_fitted.fill_(True)
        return self
