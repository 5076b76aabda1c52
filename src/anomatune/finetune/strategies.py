"""What each mode of the fine-tuning trains, and how it gets a step's features.

- :class:`AdaptorStrategy` (``mode=adaptor``): a small :class:`Adaptor` on top of the frozen
  stage features, which are computed once (the good images, a pool of negatives, the
  validation images): the backbone never runs during training. One process.
- :class:`BackboneStrategy` (``mode=backbone``): the backbone's late blocks (the stem and
  the first ``frozen_blocks`` stay pretrained), under DistributedDataParallel with
  torchrun; with ``trust`` the frozen backbone's features anchor the good ones.

Both hand the loop the same thing each step (stage features of the good and negative
images, the negatives' masks, the good images' frozen features), so the loop does not
know which mode it runs.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch

from ..errors import AnomatuneError
from ..features.adaptor import PREFIX, Adaptor
from ..features.backbones import Backbone
from ..features.extractor import FeatureExtractor
from . import diagnostics
from .ddp import ProcessGroup, StageFeatures
from .negatives import NegativeSampler
from .settings import FinetuneSettings

NEGATIVE_POOL = 96  # negative images whose stage features mode=adaptor computes once
MIN_ELIGIBLE = 8  # pool negatives a step may draw from, at least, however high the curriculum's floor
STEM = ("conv_stem", "bn1", "patch_embed", "cls_token", "pos_embed", "reg_token")  # CNN and ViT names of a backbone's stem


class StepBatch(NamedTuple):
    """One step's stage features (good images first, then the image negatives), the negatives' masks, and the good
    images' frozen features (the trust region's anchor)."""

    stage: torch.Tensor
    masks: torch.Tensor
    frozen: torch.Tensor | None


def flip(images: torch.Tensor, axes: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal (``h`` in ``axes``) and/or vertical (``v``) flips, one draw per image and axis."""
    for axis, letter in ((-1, "h"), (-2, "v")):
        if letter in axes:
            flipped = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(axis), images)
    return images


def frozen_stage_features(extractor: FeatureExtractor, images: torch.Tensor, desc: str) -> torch.Tensor:
    """Stage features (before any adaptor) of ``images`` with the extractor in eval mode, on the CPU."""
    return extractor.eval().extract(torch.split(images, diagnostics.FEATURE_BATCH), desc=desc, raw=True, adapt=False)


class AdaptorStrategy:
    """``mode=adaptor``: train an :class:`Adaptor` on stage features computed once."""

    learning_rate = 1e-3  # Adam's, when lr is not set

    def __init__(self, settings: FinetuneSettings, extractor: FeatureExtractor, group: ProcessGroup, device: torch.device):
        if group.size > 1:
            raise AnomatuneError("torchrun fine-tunes the whole backbone (--mode backbone); an adaptor trains on one process")
        if extractor.adaptor is not None:
            raise AnomatuneError(
                f"{settings.features.backbone_weights} already holds an adaptor: fine-tune its backbone "
                "(mode=backbone) or start from the frozen weights"
            )
        extractor.adaptor = Adaptor(extractor.raw_dim, settings.adaptor_width, seed=settings.seed).to(device)
        self.settings, self.extractor, self.device = settings, extractor, device
        self.cache: dict[str, torch.Tensor] = {}

    @property
    def trained(self) -> torch.nn.Module:
        return self.extractor.adaptor

    def trainable(self) -> list[torch.nn.Parameter]:
        self.extractor.model.requires_grad_(False)
        return list(self.trained.parameters())

    def prepare(self, good_stage: torch.Tensor, fit_index: torch.Tensor, sampler: NegativeSampler) -> None:
        """Keep the good images' stage features ``good_stage`` and draw the pool of image negatives (from a seed of their
        own, so a resumed run draws the same) with their stage features and masks."""
        pool = sampler.sample(NEGATIVE_POOL, torch.Generator().manual_seed(self.settings.seed + 3))
        self.cache["good"], self.cache["fit"] = good_stage, good_stage[fit_index]
        self.cache["negatives"] = frozen_stage_features(self.extractor, pool.images, "negative features")
        self.cache["negative_masks"], self.cache["negative_severities"] = pool.masks, pool.severities

    def resume(self, good: torch.Tensor, fit_index: torch.Tensor, sampler: NegativeSampler) -> None:
        """The stage features computed once are computed again, identically."""
        self.prepare(frozen_stage_features(self.extractor, good, "frozen features"), fit_index, sampler)

    def batch(
        self, good: torch.Tensor, sampler: NegativeSampler, n_images: int, generator: torch.Generator, floor: float
    ) -> StepBatch:
        """Cached good features, and pool negatives of severity at least ``floor`` (at least the most severe few)."""
        s = self.settings
        cached, severities = self.cache["good"], self.cache["negative_severities"]
        positives = flip(cached[torch.randint(len(cached), (s.batch_pos,), generator=generator)], s.flip, generator)
        floor = min(floor, torch.topk(severities, min(MIN_ELIGIBLE, len(severities))).values[-1].item())
        eligible = torch.nonzero(severities >= floor).flatten()
        picks = eligible[torch.randint(len(eligible), (n_images,), generator=generator)]
        stage = torch.cat([positives, self.cache["negatives"][picks]]).to(self.device)
        return StepBatch(stage, self.cache["negative_masks"][picks], stage[: s.batch_pos])

    @torch.no_grad()
    def features(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Unprojected features of ``images`` with the current adaptor, on the device; their stage features are
        computed once and kept under ``name``."""
        if name not in self.cache:
            self.cache[name] = frozen_stage_features(self.extractor, images, f"{name} features")
        return torch.cat([self.extractor.adapt(chunk.to(self.device)) for chunk in torch.split(self.cache[name], 64)])

    def backbone_state(self, start: Backbone, trained: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The starting backbone with the ``trained`` adaptor (None: the starting one, without an adaptor)."""
        return start.model.state_dict() | {PREFIX + k: v for k, v in (trained or {}).items()}


class BackboneStrategy:
    """``mode=backbone``: train the backbone's late blocks; several processes under torchrun."""

    learning_rate = 3e-5  # Adam's, when lr is not set

    def __init__(self, settings: FinetuneSettings, extractor: FeatureExtractor, group: ProcessGroup, device: torch.device):
        self.settings, self.extractor, self.group, self.device = settings, extractor, group, device
        self.frozen = copy.deepcopy(extractor).eval().requires_grad_(False) if settings.trust else None
        self.forward_stage: torch.nn.Module = StageFeatures(extractor)

    @property
    def trained(self) -> torch.nn.Module:
        return self.extractor.model

    def trainable(self) -> list[torch.nn.Parameter]:
        """The blocks after the stem and the first ``frozen_blocks`` (which stay pretrained); under torchrun the
        stage features' forward is wrapped in DistributedDataParallel once this is known."""
        model, n_frozen = self.extractor.model, self.settings.frozen_blocks
        if n_frozen:
            parts = [getattr(model, name) for name in STEM if getattr(model, name, None) is not None]
            for part in parts + list(model.blocks[:n_frozen]):
                for p in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
                    p.requires_grad_(False)
        self.forward_stage = self.group.wrap(StageFeatures(self.extractor))
        return [p for p in model.parameters() if p.requires_grad]

    def prepare(self, good_stage: torch.Tensor, fit_index: torch.Tensor, sampler: NegativeSampler) -> None:
        """Nothing is kept: every step runs the backbone."""

    def resume(self, good: torch.Tensor, fit_index: torch.Tensor, sampler: NegativeSampler) -> None:
        """Nothing to recompute."""

    def batch(
        self, good: torch.Tensor, sampler: NegativeSampler, n_images: int, generator: torch.Generator, floor: float
    ) -> StepBatch:
        """The global batch drawn as on one process (synthetic negatives of severity at least ``floor``); this process
        computes its share."""
        s, group = self.settings, self.group
        positives = flip(good[torch.randint(len(good), (s.batch_pos,), generator=generator)], s.flip, generator)
        negatives, masks, _ = sampler.sample(n_images, generator, floor=floor)
        mine = group.share(n_images)
        positives, negatives, masks = positives[group.share(s.batch_pos)], negatives[mine], masks[mine]
        self.extractor.train()
        amp = s.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            stage = self.forward_stage(torch.cat([positives, negatives]).to(self.device)).float()
            frozen = None
            if self.frozen is not None:
                with torch.no_grad():
                    frozen = self.frozen.raw_features(positives.to(self.device)).float()
        return StepBatch(stage, masks, frozen)

    @torch.no_grad()
    def features(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Unprojected features of ``images`` with the current backbone, on the device."""
        batches = torch.split(images, diagnostics.FEATURE_BATCH)
        return self.extractor.eval().extract(batches, desc=f"{name} features", raw=True).to(self.device)

    def backbone_state(self, start: Backbone, trained: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The starting backbone (whose stages the extractor pruned) with the ``trained`` weights (None: the starting
        ones), and the starting backbone's adaptor when it had one."""
        state = start.model.state_dict() | (trained or {})
        return state | {PREFIX + k: v for k, v in (start.adaptor or {}).items()}


STRATEGIES = {"adaptor": AdaptorStrategy, "backbone": BackboneStrategy}
