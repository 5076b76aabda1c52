"""The fine-tuning loop: Adam on the backbone, guided by an online density model.

Each step takes ``batch_pos`` good training images and ``batch_neg`` negatives (natural
crops colour-mapped onto good images, whole or pasted into them); the guiding model (a
:class:`DensityModel`: GMM, GLAD or PaDiM, fitted on the frozen features in the fixed
projection space) first follows the detached good features by online EM, then scores
both: loss = mean L_pos over good patches + mean L_neg over the negatives kept by the
outlier filter. Batch-norm statistics stay frozen.

The run folder (a :class:`RunFolder` of kind ``finetune``) gets ``checkpoint.pt`` every
``checkpoint_every`` steps (atomically; read back with ``weights_only=True``) and, at the
end, ``backbone.safetensors`` (the whole backbone, for ``fit --backbone-weights``),
``finetune.yaml``, ``diagnostics.json`` and the figures. Every draw goes through one
seeded generator saved in the checkpoints: ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import AnomalyDataset, NaturalImages, collate
from ..device import resolve_device
from ..errors import AnomatuneError, RunFolderError
from ..features.backbones import create_backbone
from ..features.extractor import FeatureExtractor
from ..models.base import DensityModel, flatten_patches
from ..models.registry import DETECTORS, create_detector
from ..pipeline.folders import RunFolder, resolve_weights
from ..pipeline.settings import RuntimeSettings
from . import diagnostics
from .loss import MixtureLoss, auto_temperature, boundary_log_density, keep_negatives
from .negatives import NegativeSampler, patch_mask
from .settings import FinetuneSettings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
COLLAPSE_RATIO = 0.25  # good-feature variance falling below this share of the start's is a collapse


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
    """One fine-tuning run: set-up on the frozen backbone, steps, checkpoints, outputs.

    ``train``: the good training images (any layout, see ``anomatune.data.open_dataset``);
    ``negatives``: a folder of natural photos; ``out``: the run folder; ``runtime``: ``device``.
    """

    def __init__(self, train: AnomalyDataset, negatives: str | Path, out: str | Path, settings: FinetuneSettings | None = None,
                 **runtime):
        self.settings = s = settings or FinetuneSettings()
        self.guide = guide_for(s)
        self.folder, self.device = RunFolder(out), resolve_device(RuntimeSettings().updated(**runtime).device)
        self.size = train.size_for(s.features.image_size)
        self.data = {"train": train.source.to_dict() if train.source else train.name, "negatives": str(Path(negatives).resolve()),
                     "input_size": list(self.size)}
        self.good = _load_images(train.at_size(self.size))
        self.sampler = NegativeSampler(NaturalImages(negatives, image_size=self.size), self.good, s)
        self.weights = resolve_weights(s.features.backbone_weights)
        backbone = create_backbone(s.features.backbone, weights=self.weights)
        self.extractor = FeatureExtractor(s.features, backbone=backbone, seed=s.seed).to(self.device)
        self.weights_id = self.extractor.weights_id
        self.generator = torch.Generator().manual_seed(s.seed)
        n_diag = min(s.diag_images, len(self.good))
        self.diag_good = self.good[torch.linspace(0, len(self.good) - 1, n_diag).long()]
        self.diag_negatives, self.diag_masks = self.sampler.sample(s.diag_images, torch.Generator().manual_seed(s.seed + 1))
        self.loss = MixtureLoss(s.alpha, temperature=s.temperature)
        self.history: list[dict] = []
        self.step_done = 0
        self.start_summary: dict | None = None

    # -- set-up on the frozen backbone ---------------------------------------------------------

    def setup(self) -> dict:
        """Fit the projection and the guiding model on the frozen features, calibrate log L, diagnose."""
        s = self.settings
        if s.features.proj_dim is not None and s.features.proj == "pca":
            self.extractor.fit_projection(torch.split(self.good, diagnostics.FEATURE_BATCH), seed=s.seed)
        features = self.extractor.eval().extract(torch.split(self.good, diagnostics.FEATURE_BATCH), desc="frozen features")
        self.guide.fit(features.to(self.device))
        self.guide.to(self.device)
        grid = features.shape[-2:]
        good_ld = diagnostics.log_densities(self.guide, flatten_patches(features), grid)
        _, neg_u, _ = diagnostics.patch_features(self.extractor, self.diag_negatives, diagnostics.FEATURE_BATCH)
        neg_ld = diagnostics.log_densities(self.guide, neg_u, grid)[patch_mask(self.diag_masks, grid)]
        if s.temperature == 0:
            self.loss.temperature = auto_temperature(good_ld, neg_ld)
            log.info("temperature (auto): %.3g", self.loss.temperature)
        self.loss.calibrate(boundary_log_density(good_ld, neg_ld, s.calibration, s.boundary_quantile))
        self.start_summary = self.diagnose()
        return self.start_summary

    def diagnose(self) -> dict:
        s = self.settings
        return diagnostics.weight_summary(self.guide, self.loss, self.extractor, self.diag_good, self.diag_negatives, self.diag_masks,
                                          s.filter, s.filter_fraction, s.batch_neg)

    # -- training ------------------------------------------------------------------------------

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam on the trained blocks (the stem and the first ``frozen_blocks`` blocks stay pretrained)."""
        model, n_frozen = self.extractor.model, self.settings.frozen_blocks
        if n_frozen:
            stem = ("conv_stem", "bn1", "patch_embed", "cls_token", "pos_embed", "reg_token")  # CNN and ViT names
            parts = [getattr(model, name) for name in stem if getattr(model, name, None) is not None]
            for part in parts + list(model.blocks[:n_frozen]):
                for p in part.parameters() if isinstance(part, torch.nn.Module) else [part]:
                    p.requires_grad_(False)
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.settings.lr)

    def step(self, optimizer: torch.optim.Optimizer) -> dict:
        """One optimisation step; returns its record (loss terms and mean gradient weights)."""
        s, g = self.settings, self.generator
        positives = _flip(self.good[torch.randint(len(self.good), (s.batch_pos,), generator=g)], s.flip, g)
        negatives, masks = self.sampler.sample(s.batch_neg, g)
        self.extractor.train()
        amp = s.amp and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            features = self.extractor(torch.cat([positives, negatives]).to(self.device))
        b, _, h, w = features.shape
        u = flatten_patches(features.float())
        positions = torch.arange(h * w, device=self.device).repeat(b)
        n_pos = s.batch_pos * h * w
        self.guide.online_update(u[:n_pos].detach(), positions[:n_pos], s.decay)
        inside = n_pos + torch.nonzero(patch_mask(masks, (h, w))).flatten().to(self.device)
        ld_pos = self.guide.log_density(u[:n_pos], positions[:n_pos])
        ld_neg = self.guide.log_density(u[inside], positions[inside])
        kept = keep_negatives(ld_neg, self.loss, s.filter, s.filter_fraction)
        loss_pos = self.loss.positive(ld_pos).mean()
        loss_neg = self.loss.negative(ld_neg[kept]).sum() / max(len(kept), 1)
        loss = loss_pos + loss_neg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()} (L_pos {loss_pos.item()}, L_neg {loss_neg.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.extractor.model.parameters(), s.clip_grad)
        optimizer.step()
        with torch.no_grad():
            p_neg = self.loss.p_inside(ld_neg)
            return {"step": self.step_done + 1, "loss": loss.item(), "loss_pos": loss_pos.item(), "loss_neg": loss_neg.item(),
                    "p_pos_misclassified": (1 - self.loss.p_inside(ld_pos)).mean().item(), "p_neg_inside": p_neg.mean().item() if len(p_neg) else 0.0,
                    "p_kept_inside": p_neg[kept].mean().item() if len(kept) else 0.0}

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, optimizer) -> None:
        self.folder.write_torch(RunFolder.CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "step": self.step_done, "settings": self.settings.to_dict(),
            "extractor": self.extractor.state_dict(), "optimizer": optimizer.state_dict(), "guide": self.guide.state_dict(),
            "log_volume": self.loss.log_volume, "temperature": self.loss.temperature, "generator": self.generator.get_state(),
            "history": self.history, "start": self.start_summary})

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
        self.history, self.step_done, self.start_summary = state["history"], state["step"], state["start"]

    def run(self, resume: bool = False) -> dict:
        """Set up (or resume), train, write the fine-tuned backbone and the diagnostics."""
        with self.folder.claim("finetune"):
            self.folder.path.mkdir(parents=True, exist_ok=True)
            return self._train(resume)

    def _train(self, resume: bool) -> dict:
        s = self.settings
        optimizer = self.optimizer()
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
        start = time.perf_counter()
        progress = tqdm(range(self.step_done, s.steps), desc="fine-tune", initial=self.step_done, total=s.steps)
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
                self.save_checkpoint(optimizer)
        return self.finish(time.perf_counter() - start)

    # -- outputs ---------------------------------------------------------------------------------

    def save_backbone(self) -> Path:
        """The whole backbone (pruned stages restored from the starting weights) as safetensors."""
        full = create_backbone(self.settings.features.backbone, weights=self.weights).model
        full.load_state_dict(self.extractor.model.state_dict(), strict=False)
        return self.folder.write_tensors(RunFolder.BACKBONE, full.state_dict())

    def finish(self, seconds: float) -> dict:
        end = self.diagnose()
        variance_ratio = end["good_feature_variance"] / self.start_summary["good_feature_variance"]
        collapsed = variance_ratio < COLLAPSE_RATIO
        if collapsed:
            log.warning("the good features collapsed (variance x%.2f of the start's): this fine-tuning failed; "
                        "lower --lr or --steps", variance_ratio)
        self.save_backbone()
        report = {"start": self.start_summary, "end": end, "history": self.history,
                  "feature_variance_ratio": variance_ratio, "collapsed": collapsed}
        self.folder.write_json(RunFolder.DIAGNOSTICS, report, indent=None)
        record = {"anomatune_version": __version__, "kind": "finetune", "settings": self.settings.to_dict(), "data": self.data,
                  "base_weights_id": self.weights_id, "log_volume": self.loss.log_volume, "temperature": self.loss.temperature,
                  "steps_done": self.step_done, "seconds_this_session": round(seconds, 1), "collapsed": collapsed}
        self.folder.write_yaml(RunFolder.FINETUNE, record)
        title = f"{self.size[1]}x{self.size[0]} px: {self.settings.guide.name} guide, {self.step_done} steps"
        self.folder.write_figure(RunFolder.WEIGHTS_FIGURE, diagnostics.weight_figure(self.start_summary, end, title), dpi=110)
        self.folder.write_figure(RunFolder.LOSS_FIGURE, diagnostics.loss_figure(self.history), dpi=110)
        log.info("after fine-tuning:\n%s", diagnostics.describe(end))
        return report

    def dry_run(self) -> dict:
        """Set up on the frozen backbone only: the gradient-weight diagnostics, no training."""
        with self.folder.claim("finetune"):
            self.folder.path.mkdir(parents=True, exist_ok=True)
            summary = self.setup()
            self.folder.write_json(RunFolder.DRY_RUN, summary)
            self.folder.write_figure(RunFolder.DRY_RUN_FIGURE, diagnostics.weight_figure(summary, None, "frozen features"), dpi=110)
        return summary


def finetune(train: AnomalyDataset, negatives, out, settings: FinetuneSettings | None = None, resume: bool = False, **runtime) -> dict:
    """Fine-tune the backbone on the good images of ``train`` against ``negatives``; see :class:`Finetuner`."""
    return Finetuner(train, negatives, out, settings, **runtime).run(resume)


def dry_run(train: AnomalyDataset, negatives, out, settings: FinetuneSettings | None = None, **runtime) -> dict:
    """The gradient-weight diagnostics on the frozen features, no training (``anomatune finetune --dry-run``)."""
    return Finetuner(train, negatives, out, settings, **runtime).dry_run()
