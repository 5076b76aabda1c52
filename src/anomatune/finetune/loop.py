"""The fine-tuning loop: Adam on the backbone (or on an adaptor), guided by an online density model.

Each step takes ``batch_pos`` good training images and ``batch_neg`` negatives (see
:class:`NegativeSampler`, plus feature-space ``noise``); the guiding model (a
:class:`DensityModel`: GMM, GLAD or PaDiM, fitted on the frozen features in the fixed
projection space) first follows the detached good features by online EM, then scores
both: loss = mean L_pos over good patches + mean L_neg over the negatives kept by the
outlier filter (+ ``trust`` × the good features' squared drift from the frozen ones).
Batch-norm statistics stay frozen. In ``mode=adaptor`` the backbone never runs during
training: the stage features of the good images and of a pool of negatives are
computed once, and only the :class:`Adaptor` learns.

Every ``checkpoint_every`` steps the current features are validated (see
:mod:`.validation`) and the best checkpoint so far is remembered; the frozen features
are checkpoint 0. If no checkpoint beats them, the fine-tuning falls back: its
``backbone.safetensors`` is the frozen backbone, and ``diagnostics.json``,
``finetune.yaml`` and the report say so. The last step's weights are kept as
``backbone_last.safetensors`` for whoever wants them anyway.

The run folder (a :class:`RunFolder` of kind ``finetune``) gets ``checkpoint.pt`` at every
checkpoint (atomically; read back with ``weights_only=True``). Every draw goes through
one seeded generator saved in the checkpoints: ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import AnomalyDataset, NaturalImages, collate
from ..device import resolve_device
from ..errors import AnomatuneError, RunFolderError
from ..features.adaptor import PREFIX, Adaptor
from ..features.backbones import Backbone, create_backbone
from ..features.extractor import FeatureExtractor
from ..models.base import DensityModel, flatten_patches
from ..models.registry import DETECTORS, create_detector
from ..pipeline.folders import RunFolder, resolve_weights
from ..pipeline.settings import RuntimeSettings
from . import diagnostics
from .ddp import Ranks, StageFeatures
from .loss import MixtureLoss, auto_temperature, boundary_log_density, keep_negatives
from .negatives import NegativeSampler, patch_mask
from .settings import FinetuneSettings
from .validation import ValidationSet, holdout, validation_score

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
COLLAPSE_RATIO = 0.25  # good-feature variance falling below this share of the start's is a collapse
NEGATIVE_POOL = 64  # negative images whose stage features mode=adaptor computes once
LEARNING_RATES = {"backbone": 3e-5, "adaptor": 1e-3}  # Adam's, when lr is not set


def _load_images(dataset: AnomalyDataset, batch_size: int = 16) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return torch.cat([batch["image"] for batch in tqdm(loader, desc="load good images", leave=False)])


def _flip(images: torch.Tensor, flip: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and/or vertical flips, one draw per image and axis."""
    for axis, letter in ((-1, "h"), (-2, "v")):
        if letter in flip:
            flipped = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(axis), images)
    return images


def guide_for(settings: FinetuneSettings):
    """The guiding model: a fresh detector of the guide settings, seeded by the fine-tuning's seed.

    It must be a :class:`DensityModel`; anything else is refused before any work starts.
    """
    guide = create_detector(settings.guide.updated(seed=settings.seed) if hasattr(settings.guide, "seed") else settings.guide)
    if not isinstance(guide, DensityModel):
        usable = [name for name, cls in DETECTORS.items() if issubclass(cls, DensityModel)]
        raise AnomatuneError(f"{guide.name} cannot guide the fine-tuning: it has no log_density and online_update; "
                             f"use one of {', '.join(usable)}")
    return guide


class Finetuner:
    """One fine-tuning run: set-up on the frozen backbone, steps, validation, checkpoints, outputs.

    ``train``: the good training images (any layout, see ``anomatune.data.open_dataset``);
    ``negatives``: a folder of natural photos (needed by the photos and pasted kinds);
    ``validation_negatives``: a second folder of photos for the validation's defects
    (default: noise defects only); ``out``: the run folder; ``runtime``: ``device``.
    """

    def __init__(self, train: AnomalyDataset, negatives: str | Path | None, out: str | Path,
                 settings: FinetuneSettings | None = None, validation_negatives: str | Path | None = None, **runtime):
        self.settings = s = settings or FinetuneSettings()
        self.guide = guide_for(s)
        needs_photos = {"photos", "pasted"} & set(s.negative_kinds)
        if needs_photos and negatives is None:
            raise AnomatuneError(f"negative_mode {s.negative_mode} needs a folder of natural photos: pass --negatives DIR")
        device = resolve_device(RuntimeSettings().updated(**runtime).device)
        self.ranks = Ranks.from_env(device)  # one process, or torchrun's (see .ddp)
        if self.ranks.world > 1 and s.mode != "backbone":
            raise AnomatuneError("torchrun fine-tunes the whole backbone (--mode backbone); an adaptor trains on one process")
        self.folder, self.device = RunFolder(out), self.ranks.local_device(device)
        self.size = train.size_for(s.features.image_size)
        self.data = {"train": train.source.to_dict() if train.source else train.name,
                     "negatives": None if negatives is None else str(Path(negatives).resolve()),
                     "validation_negatives": None if validation_negatives is None else str(Path(validation_negatives).resolve()),
                     "input_size": list(self.size)}
        if validation_negatives is not None and self.data["validation_negatives"] == self.data["negatives"]:
            log.warning("--validation-negatives is the training negatives' folder: the validation then rewards "
                        "what the training learnt; pass another photo source")
        self.good, self.valset = self.hold_out(_load_images(train.at_size(self.size)), validation_negatives)
        self.fit_index = torch.linspace(0, len(self.good) - 1, min(s.validation_fit_images, len(self.good))).long()
        natural = None if negatives is None else NaturalImages(negatives, image_size=self.size)
        self.sampler = NegativeSampler(natural, self.good, s)
        self.n_noise = sum(s.negative_kinds[i % len(s.negative_kinds)] == "noise" for i in range(s.batch_neg))
        self.weights = resolve_weights(s.features.backbone_weights)
        backbone = create_backbone(s.features.backbone, weights=self.weights)
        self.extractor = FeatureExtractor(s.features, backbone=backbone, seed=s.seed).to(self.device)
        if s.mode == "adaptor":
            if self.extractor.adaptor is not None:
                raise AnomatuneError(f"{self.weights} already holds an adaptor: fine-tune its backbone (mode=backbone) "
                                     "or start from the frozen weights")
            self.extractor.adaptor = Adaptor(self.extractor.raw_dim, s.adaptor_width, seed=s.seed).to(self.device)
        self.frozen = None  # the frozen extractor, for the trust region of mode=backbone
        if s.trust and s.mode == "backbone":
            self.frozen = copy.deepcopy(self.extractor).eval().requires_grad_(False)
        self.weights_id = self.extractor.weights_id
        self.forward_stage: torch.nn.Module = StageFeatures(self.extractor)  # under DDP once the optimizer knows what trains
        self.generator = torch.Generator().manual_seed(s.seed)
        n_diag = min(s.diag_images, len(self.good))
        self.diag_good = self.good[torch.linspace(0, len(self.good) - 1, n_diag).long()]
        self.diag_negatives, self.diag_masks = self.sampler.sample(s.diag_images, torch.Generator().manual_seed(s.seed + 1))
        self.loss = MixtureLoss(s.alpha, temperature=s.temperature)
        self.cache: dict[str, torch.Tensor] = {}  # stage features computed once (mode=adaptor)
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.best: dict | None = None  # {"step", "score", "state"}: the best checkpoint on validation
        self.step_done = 0
        self.start_summary: dict | None = None
        self.noise_basis: torch.Tensor | None = None

    def hold_out(self, images: torch.Tensor, validation_negatives) -> tuple[torch.Tensor, ValidationSet | None]:
        """The good images to train on, and the validation set made from the held-out ones (None without any)."""
        s = self.settings
        kept, held = holdout(len(images), s.validation_share, s.seed)
        if not len(held):
            if s.validation_share:
                log.warning("too few good images to hold some out: no validation, the last step is kept")
            return images, None
        natural = None if validation_negatives is None else NaturalImages(validation_negatives, image_size=self.size)
        valset = ValidationSet.build(images[held], natural, s, s.seed + 2)
        log.info("validation: %d held-out good images, %d with synthetic defects (%s)", len(held), int(valset.labels.sum()),
                 ", ".join(sorted(set(valset.kinds) - {"good"})))
        return images[kept], valset

    @property
    def trained(self) -> torch.nn.Module:
        """The module whose weights the fine-tuning changes."""
        return self.extractor.adaptor if self.settings.mode == "adaptor" else self.extractor.model

    # -- set-up on the frozen backbone ---------------------------------------------------------

    def stage_features(self, images: torch.Tensor, desc: str) -> torch.Tensor:
        """Frozen stage features (before the adaptor) of ``images``, on the CPU."""
        return self.extractor.eval().extract(torch.split(images, diagnostics.FEATURE_BATCH), desc=desc, raw=True, adapt=False)

    def setup(self) -> dict:
        """Fit the projection and the guiding model on the frozen features, calibrate log L, validate, diagnose."""
        s = self.settings
        stage = self.stage_features(self.good, "frozen features")  # one pass over the images serves the PCA and the guide
        with torch.no_grad():
            raw = torch.cat([self.extractor.adapt(chunk.to(self.device)).cpu() for chunk in torch.split(stage, 64)])
            self.extractor.fit_projection_on(raw, seed=s.seed)
            features = torch.cat([self.extractor.project(chunk.to(self.device)).cpu() for chunk in torch.split(raw, 64)])
        del raw
        if s.mode == "adaptor":
            self.cache_stage_features(stage)
        del stage
        self.guide.fit(features.to(self.device))
        self.guide.to(self.device)
        grid = features.shape[-2:]
        u = flatten_patches(features)
        if self.n_noise:
            values, vectors = torch.linalg.eigh(torch.cov(u.double().T))  # ascending
            low = vectors[:, : max(1, len(values) // 2)]
            self.noise_basis = (low * values.clamp_min(0).mean().sqrt()).float().to(self.device)
        good_ld = diagnostics.log_densities(self.guide, u, grid)
        _, neg_u, _ = diagnostics.patch_features(self.extractor, self.diag_negatives, diagnostics.FEATURE_BATCH)
        neg_ld = diagnostics.log_densities(self.guide, neg_u, grid)[patch_mask(self.diag_masks, grid)]
        if s.temperature == 0:
            self.loss.temperature = auto_temperature(good_ld, neg_ld)
            log.info("temperature (auto): %.3g", self.loss.temperature)
        self.loss.calibrate(boundary_log_density(good_ld, neg_ld, s.calibration, s.boundary_quantile))
        self.start_summary = self.diagnose()
        return self.start_summary

    def cache_stage_features(self, good: torch.Tensor) -> None:
        """What mode=adaptor trains on: the good images' stage features ``good``, and a pool of image negatives (drawn
        from a seed of their own, so a resumed run draws the same) with their stage features and masks."""
        negatives, masks = self.sampler.sample(NEGATIVE_POOL, torch.Generator().manual_seed(self.settings.seed + 3))
        self.cache["good"] = good
        self.cache["negatives"], self.cache["negative_masks"] = self.stage_features(negatives, "negative features"), masks

    def diagnose(self) -> dict:
        s = self.settings
        return diagnostics.weight_summary(self.guide, self.loss, self.extractor, self.diag_good, self.diag_negatives, self.diag_masks,
                                          s.filter, s.filter_fraction, s.batch_neg)

    # -- training ------------------------------------------------------------------------------

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam on the adaptor, or on the trained blocks (the stem and the first ``frozen_blocks`` stay pretrained)."""
        model, n_frozen = self.extractor.model, self.settings.frozen_blocks
        if self.settings.mode == "adaptor":
            model.requires_grad_(False)
        elif n_frozen:
            stem = ("conv_stem", "bn1", "patch_embed", "cls_token", "pos_embed", "reg_token")  # CNN and ViT names
            parts = [getattr(model, name) for name in stem if getattr(model, name, None) is not None]
            for part in parts + list(model.blocks[:n_frozen]):
                for p in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
                    p.requires_grad_(False)
        lr = self.settings.lr or LEARNING_RATES[self.settings.mode]
        return torch.optim.Adam([p for p in self.trained.parameters() if p.requires_grad], lr=lr)

    def stage_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage features of this step's good and image-negative batch, the negatives' masks, and the good ones' frozen features."""
        s, g = self.settings, self.generator
        n_images = s.batch_neg - self.n_noise
        if s.mode == "adaptor":
            good = _flip(self.cache["good"][torch.randint(len(self.cache["good"]), (s.batch_pos,), generator=g)], s.flip, g)
            picks = torch.randint(NEGATIVE_POOL, (n_images,), generator=g)
            stage = torch.cat([good, self.cache["negatives"][picks]]).to(self.device)
            return stage, self.cache["negative_masks"][picks], stage[: s.batch_pos]
        positives = _flip(self.good[torch.randint(len(self.good), (s.batch_pos,), generator=g)], s.flip, g)
        negatives, masks = self.sampler.sample(n_images, g)  # the global batch; this process computes its share
        mine = self.ranks.share(n_images)
        positives, negatives, masks = positives[self.ranks.share(s.batch_pos)], negatives[mine], masks[mine]
        self.extractor.train()
        amp = s.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            stage = self.forward_stage(torch.cat([positives, negatives]).to(self.device)).float()
            frozen = None
            if self.frozen is not None:
                with torch.no_grad():
                    frozen = self.frozen.raw_features(positives.to(self.device)).float()
        return stage, masks, frozen

    def step(self, optimizer: torch.optim.Optimizer) -> dict:
        """One optimisation step; returns its record (loss terms and mean gradient weights).

        Under torchrun every sum below is this process's share and every count the global
        one (see :mod:`.ddp`); on one process the shares are the whole batch.
        """
        s, g, ranks = self.settings, self.generator, self.ranks
        stage, masks, frozen = self.stage_batch()
        raw = self.extractor.adapt(stage)
        features = self.extractor.project(raw)
        mine = ranks.share(s.batch_pos)
        b, _, h, w = features.shape
        n_pos = (mine.stop - mine.start) * h * w
        u = flatten_patches(features)
        positions = torch.arange(h * w, device=self.device).repeat(b)
        inside = n_pos + torch.nonzero(patch_mask(masks, (h, w))).flatten().to(self.device)
        u_neg, neg_positions = u[inside], positions[inside]
        if self.n_noise:  # good patches moved along the guide space's low-variance directions
            source = torch.randint(s.batch_pos, (self.n_noise,), generator=g)
            noise = torch.randn(self.n_noise * h * w, self.noise_basis.shape[1], generator=g).view(self.n_noise, h * w, -1)
            local = (source >= mine.start) & (source < mine.stop)  # the noise negatives of this process's good images
            noisy = u[:n_pos].view(mine.stop - mine.start, h * w, -1)[source[local] - mine.start].flatten(0, 1)
            noise = noise[local].flatten(0, 1).to(self.device) @ self.noise_basis.T
            u_neg = torch.cat([u_neg, noisy + s.noise_scale * noise])
            neg_positions = torch.cat([neg_positions, positions[:h * w].repeat(int(local.sum()))])
        self.guide.online_update(ranks.gather(u[:n_pos]), positions[:h * w].repeat(s.batch_pos), s.decay)
        ld_pos = self.guide.log_density(u[:n_pos], positions[:n_pos])
        ld_neg = self.guide.log_density(u_neg, neg_positions)
        kept = keep_negatives(ld_neg, self.loss, s.filter, s.filter_fraction, population=ranks.gather(ld_neg) if ranks.world > 1 else None)
        n_all_pos, n_all_neg, n_all_kept = ranks.sum(torch.tensor([n_pos, len(ld_neg), len(kept)], dtype=torch.float64)).tolist()
        loss_pos = self.loss.positive(ld_pos).sum() / n_all_pos
        loss_neg = self.loss.negative(ld_neg[kept]).sum() / max(n_all_kept, 1)
        loss = loss_pos + loss_neg
        drift = torch.zeros((), device=self.device)
        if s.trust and frozen is not None:
            drift = (raw[: len(frozen)] - frozen).pow(2).sum(1).sum() / n_all_pos / self.frozen_variance(frozen)
            loss = loss + s.trust * drift
        with torch.no_grad():
            p_neg = self.loss.p_inside(ld_neg)
            sums = ranks.sum(torch.stack([loss, loss_pos, loss_neg, drift, (1 - self.loss.p_inside(ld_pos)).sum(), p_neg.sum(),
                                          p_neg[kept].sum()]).double()).tolist()
        if not math.isfinite(sums[0]):
            raise FloatingPointError(f"loss {sums[0]} (L_pos {sums[1]}, L_neg {sums[2]})")
        optimizer.zero_grad(set_to_none=True)
        (loss * ranks.world).backward()  # DDP averages the processes' gradients: their sum is the global batch's
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), s.clip_grad)
        optimizer.step()
        return {"step": self.step_done + 1, "loss": sums[0], "loss_pos": sums[1], "loss_neg": sums[2], "drift": sums[3],
                "p_pos_misclassified": sums[4] / n_all_pos, "p_neg_inside": sums[5] / n_all_neg if n_all_neg else 0.0,
                "p_kept_inside": sums[6] / n_all_kept if n_all_kept else 0.0}

    def frozen_variance(self, frozen: torch.Tensor) -> torch.Tensor:
        """The summed per-channel variance of the global batch's frozen good features (the drift's scale)."""
        f = frozen.detach().double()
        c = f.shape[1]
        n, total, squares = self.ranks.sum(torch.cat([torch.tensor([f.numel() / c], dtype=torch.float64, device=f.device),
                                                      f.sum((0, 2, 3)), (f**2).sum((0, 2, 3))])).split([1, c, c])
        return ((squares - total**2 / n) / (n - 1)).sum().clamp_min(1e-12).float()

    # -- validation ------------------------------------------------------------------------------

    @torch.no_grad()
    def current_features(self, images: torch.Tensor, stage: torch.Tensor | None) -> torch.Tensor:
        """Unprojected features of ``images`` with the current weights, on the device; mode=adaptor maps their ``stage``
        features, computed once, instead."""
        if self.settings.mode == "backbone":
            return self.extractor.eval().extract(torch.split(images, diagnostics.FEATURE_BATCH), desc="validation features",
                                                 raw=True).to(self.device)
        return torch.cat([self.extractor.adapt(chunk.to(self.device)) for chunk in torch.split(stage, 64)])

    def validate(self) -> None:
        """Score the current features on the validation set; remember them when they are the best so far."""
        if self.valset is None:
            return
        s = self.settings
        if s.mode == "adaptor" and "validation" not in self.cache:
            self.cache["validation"] = self.stage_features(self.valset.images, "validation features")
        fit = self.current_features(self.good[self.fit_index], self.cache["good"][self.fit_index] if s.mode == "adaptor" else None)
        features = self.current_features(self.valset.images, self.cache.get("validation"))
        result = validation_score(s.validator, fit, features, self.valset, s.seed)
        result = {"step": self.step_done, **{k: round(v, 5) for k, v in result.items()}}
        self.validation.append(result)
        frozen_score = self.validation[0]["score"]
        if self.best is None or (result["score"] > self.best["score"] and result["score"] > frozen_score + s.min_gain):
            self.best = {"step": self.step_done, "score": result["score"],
                         "state": {k: v.detach().cpu().clone() for k, v in self.trained.state_dict().items()}}
        log.info("validation at step %d: image AUROC %.4f, pixel AUROC %.4f (best: step %d)", self.step_done,
                 result["image_auroc"], result["pixel_auroc"], self.best["step"])

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, optimizer) -> None:
        self.folder.write_torch(RunFolder.CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "step": self.step_done, "settings": self.settings.to_dict(),
            "extractor": self.extractor.state_dict(), "optimizer": optimizer.state_dict(), "guide": self.guide.state_dict(),
            "log_volume": self.loss.log_volume, "temperature": self.loss.temperature, "generator": self.generator.get_state(),
            "history": self.history, "validation": self.validation, "best": self.best, "start": self.start_summary,
            "noise_basis": self.noise_basis})

    def load_checkpoint(self, optimizer) -> None:
        path = self.folder / RunFolder.CHECKPOINT
        state = self.folder.read_torch(RunFolder.CHECKPOINT)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise RunFolderError(f"{path}: checkpoint of another format (another anomatune version); delete it to start over")
        mine = self.settings.to_dict() | {"steps": None}
        theirs = state["settings"] | {"steps": None}
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise AnomatuneError(f"{path}: the checkpoint was made with other settings ({', '.join(changed)}); "
                                 "resume with the same settings (only --steps may change) or use another --out")
        self.extractor.load_state_dict(state["extractor"])
        optimizer.load_state_dict(state["optimizer"])
        self.guide.load_state_dict(state["guide"], source=str(path)).to(self.device)
        self.loss.log_volume, self.loss.temperature = state["log_volume"], state["temperature"]
        self.generator.set_state(state["generator"])
        self.history, self.validation, self.best = state["history"], state["validation"], state["best"]
        self.step_done, self.start_summary, self.noise_basis = state["step"], state["start"], state["noise_basis"]
        if self.settings.mode == "adaptor":  # the stage features computed once are computed again, identically
            self.cache_stage_features(self.stage_features(self.good, "frozen features"))

    def run(self, resume: bool = False) -> dict:
        """Set up (or resume), train, write the fine-tuned backbone and the diagnostics (rank 0 writes, and holds the lock)."""
        with self.folder.claim("finetune") if self.ranks.main else contextlib.nullcontext():
            self.folder.path.mkdir(parents=True, exist_ok=True)
            return self._train(resume)

    def _train(self, resume: bool) -> dict:
        s = self.settings
        optimizer = self.optimizer()
        self.forward_stage = self.ranks.wrap(StageFeatures(self.extractor))
        has_checkpoint = (self.folder / RunFolder.CHECKPOINT).is_file()
        if has_checkpoint and resume:
            self.load_checkpoint(optimizer)
            log.info("resumed from step %d of %s", self.step_done, self.folder / RunFolder.CHECKPOINT)
        elif has_checkpoint or (self.folder / RunFolder.BACKBONE).is_file():
            raise RunFolderError(f"{self.folder.path} already holds a fine-tuning: pass --resume to continue it, or another --out")
        else:
            if resume:
                log.warning("--resume: %s holds no checkpoint, so the fine-tuning starts from step 0", self.folder.path)
            self.setup()
            log.info("frozen features:\n%s", diagnostics.describe(self.start_summary))
            self.validate()
        start = time.perf_counter()
        progress = tqdm(range(self.step_done, s.steps), desc="fine-tune", initial=self.step_done, total=s.steps,
                        disable=not self.ranks.main)
        for _ in progress:
            try:
                record = self.step(optimizer)
            except FloatingPointError as exc:
                raise AnomatuneError(
                    f"fine-tuning stopped at step {self.step_done + 1}: {exc}. The last good checkpoint (step {self.step_done}) "
                    f"is {self.folder / RunFolder.CHECKPOINT}: lower --lr or set --clip-grad, then --resume"
                ) from None
            self.step_done += 1
            self.history.append(record)
            progress.set_postfix(loss=f"{record['loss']:.3g}", pos=f"{record['p_pos_misclassified']:.3f}",
                                 neg=f"{record['p_neg_inside']:.3f}", refresh=False)
            if self.step_done % s.checkpoint_every == 0 or self.step_done == s.steps:
                self.validate()
                if self.ranks.main:
                    self.save_checkpoint(optimizer)
        return self.finish(time.perf_counter() - start)

    # -- outputs ---------------------------------------------------------------------------------

    def backbone_state(self, start: Backbone, trained: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The whole backbone file: the starting backbone ``start`` (whose stages the extractor pruned) with the
        ``trained`` weights; None: the starting one."""
        state, adaptor = start.model.state_dict(), start.adaptor
        if self.settings.mode == "backbone":
            state.update(trained or {})
        elif trained is not None:
            adaptor = trained
        return state | {PREFIX + k: v for k, v in (adaptor or {}).items()}

    def finish(self, seconds: float) -> dict:
        if not self.ranks.main:  # rank 0 writes the outputs
            self.ranks.barrier()
            return {"rank": self.ranks.rank}
        end = self.diagnose()
        variance_ratio = end["good_feature_variance"] / self.start_summary["good_feature_variance"]
        collapsed = variance_ratio < COLLAPSE_RATIO
        if collapsed:
            log.warning("the good features collapsed (variance x%.2f of the start's): this fine-tuning failed; "
                        "lower --lr or --steps", variance_ratio)
        last = {k: v.detach().cpu() for k, v in self.trained.state_dict().items()}
        kept_step = self.step_done if self.best is None else self.best["step"]
        fallback = self.best is not None and kept_step == 0
        start = create_backbone(self.settings.features.backbone, weights=self.weights)  # read once for both files
        if self.best is None:
            self.folder.write_tensors(RunFolder.BACKBONE, self.backbone_state(start, last))
        else:
            self.folder.write_tensors(RunFolder.BACKBONE, self.backbone_state(start, None if fallback else self.best["state"]))
            self.folder.write_tensors(RunFolder.LAST_BACKBONE, self.backbone_state(start, last))
        if fallback:
            log.warning("no checkpoint beat the frozen features on validation: %s holds the frozen backbone "
                        "(the last step's weights are %s)", RunFolder.BACKBONE, RunFolder.LAST_BACKBONE)
        elif self.best is not None:
            log.info("kept step %d, the best on validation (%s)", kept_step, RunFolder.BACKBONE)
        outcome = {"kept_step": kept_step, "fallback": fallback, "collapsed": collapsed}
        report = {"start": self.start_summary, "end": end, "history": self.history, "validation": self.validation,
                  "feature_variance_ratio": variance_ratio, **outcome}
        self.folder.write_json(RunFolder.DIAGNOSTICS, report, indent=None)
        record = {"anomatune_version": __version__, "kind": "finetune", "settings": self.settings.to_dict(), "data": self.data,
                  "base_weights_id": self.weights_id, "log_volume": self.loss.log_volume, "temperature": self.loss.temperature,
                  "steps_done": self.step_done, "seconds_this_session": round(seconds, 1), **outcome,
                  "validation": self.validation and {"frozen": self.validation[0], "kept": next(v for v in self.validation
                                                                                               if v["step"] == kept_step)}}
        self.folder.write_yaml(RunFolder.FINETUNE, record)
        title = f"{self.size[1]}x{self.size[0]} px: {self.settings.guide.name} guide, {self.step_done} steps"
        self.folder.write_figure(RunFolder.WEIGHTS_FIGURE, diagnostics.weight_figure(self.start_summary, end, title), dpi=110)
        self.folder.write_figure(RunFolder.LOSS_FIGURE, diagnostics.loss_figure(self.history, self.validation), dpi=110)
        log.info("after fine-tuning:\n%s", diagnostics.describe(end))
        self.ranks.barrier()  # the other processes end once the outputs are written
        return report

    def dry_run(self) -> dict:
        """Set up on the frozen backbone only: the gradient-weight diagnostics, no training."""
        with self.folder.claim("finetune"):
            self.folder.path.mkdir(parents=True, exist_ok=True)
            summary = self.setup()
            self.folder.write_json(RunFolder.DRY_RUN, summary)
            self.folder.write_figure(RunFolder.DRY_RUN_FIGURE, diagnostics.weight_figure(summary, None, "frozen features"), dpi=110)
        return summary


def finetune(train: AnomalyDataset, negatives, out, settings: FinetuneSettings | None = None, resume: bool = False,
             validation_negatives=None, **runtime) -> dict:
    """Fine-tune on the good images of ``train`` against ``negatives``; see :class:`Finetuner`."""
    return Finetuner(train, negatives, out, settings, validation_negatives, **runtime).run(resume)


def dry_run(train: AnomalyDataset, negatives, out, settings: FinetuneSettings | None = None, **runtime) -> dict:
    """The gradient-weight diagnostics on the frozen features, no training (``anomatune finetune --dry-run``)."""
    return Finetuner(train, negatives, out, settings, **runtime).dry_run()
