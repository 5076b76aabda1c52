"""The fine-tuning loop: Adam on an adaptor or on the backbone, guided by an online density model.

Each step takes ``batch_pos`` good training images and ``batch_neg`` negatives (see
:class:`NegativeSampler`, plus feature-space ``noise``); the guiding model (a
:class:`DensityModel`: GMM, GLAD or PaDiM, fitted on the frozen features in the fixed
projection space) first follows the detached good features by online EM, then scores
both: loss = mean L_pos over good patches + mean L_neg over the negatives kept by the
outlier filter (+ ``trust`` × the good features' squared drift from the frozen ones).
Batch-norm statistics stay frozen. What trains, and where a step's features come from,
is the mode's strategy (:mod:`.strategies`); the loop is the same for both.

Every ``checkpoint_every`` steps the current features are validated on the label-free
validation set (:mod:`anomatune.validation`), scored by the ``validator`` detector refit on
them, and the best checkpoint so far is remembered; the frozen features
are checkpoint 0. If no checkpoint beats them, the fine-tuning falls back: its
``backbone.safetensors`` is the frozen backbone, and ``diagnostics.json``,
``finetune.yaml`` and the report say so (:mod:`.outputs` writes them all). Every draw
goes through the one seeded generator of the :class:`TrainingState`, saved in every
checkpoint: ``--resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.datasets import AnomalyDataset, NaturalImages
from ..device import resolve_device
from ..errors import AnomatuneError, RunFolderError
from ..features.backbones import create_backbone
from ..features.extractor import FeatureExtractor
from ..folders.base import refuse_inside
from ..folders.kinds import FinetuneFolder
from ..models.base import DensityModel, flatten_patches
from ..models.registry import create_detector
from ..models.settings import DetectorSettings, detector_settings
from ..pipeline.settings import RuntimeSettings
from ..validation.scoring import score_detector
from ..validation.search import SEARCH_CORESET, SEARCH_EM
from ..validation.sets import ValidationSet, load_images, validation_set, validation_split
from ..validation.settings import ValidationSettings
from . import diagnostics
from .ddp import ProcessGroup
from .loss import MixtureLoss, auto_temperature, boundary_log_density, keep_negatives
from .negatives import NegativeSampler, clean_mask, most_covered, patch_mask
from .outputs import FinetuneOutputs
from .settings import FinetuneSettings
from .state import TrainingState
from .strategies import STRATEGIES, frozen_stage_features

log = logging.getLogger(__name__)

COLLAPSE_RATIO = 0.25  # good-feature variance falling below this share of the start's is a collapse


def validator_settings(settings: FinetuneSettings) -> DetectorSettings:
    """The detector that scores the validation: the user's (``validator``), seeded by the fine-tuning's seed, with the
    detector search's budget (EM for the mixtures, coreset for PatchCore: it is refit at every checkpoint)."""
    validator = detector_settings(settings.validator)
    if hasattr(validator, "max_iter"):
        validator = validator.updated(**dict(SEARCH_EM))
    if hasattr(validator, "coreset_ratio"):
        validator = validator.updated(**dict(SEARCH_CORESET))
    return validator.updated(seed=settings.seed) if hasattr(validator, "seed") else validator


def guide_for(settings: FinetuneSettings) -> DensityModel:
    """The guiding model: a fresh detector of the guide settings (every detector is a :class:`DensityModel`), seeded
    by the fine-tuning's seed."""
    guide = settings.guide.updated(seed=settings.seed) if hasattr(settings.guide, "seed") else settings.guide
    return create_detector(guide)


class Finetuner:
    """One fine-tuning run: set-up on the frozen backbone, steps, validation, checkpoints, outputs.

    ``train``: the good training images (any layout, see ``anomatune.data.open_dataset``);
    ``negatives``: a folder of natural photos (needed by the photos and pasted kinds);
    ``validation``: the validation set's families, photo source (not the ``negatives``) and real defects;
    ``out``: the fine-tuning folder; ``runtime``: ``device``.
    """

    def __init__(
        self,
        train: AnomalyDataset,
        negatives: str | Path | None,
        out: str | Path,
        settings: FinetuneSettings | None = None,
        validation: ValidationSettings | None = None,
        **runtime,
    ):
        self.settings = s = settings or FinetuneSettings()
        self.validation = validation = validation or ValidationSettings()
        self.session_start, self.validation_seconds = time.perf_counter(), 0.0  # max_minutes counts from here
        self.guide = guide_for(s)
        if {"photos", "pasted"} & set(s.negative_kinds) and negatives is None:
            raise AnomatuneError(f"negative_mode {s.negative_mode} needs a folder of natural photos: pass --negatives DIR")
        runtime = RuntimeSettings().updated(**runtime)
        device = resolve_device(runtime.device)
        self.group = ProcessGroup.from_env(device)  # one process, or torchrun's (see .ddp)
        refuse_inside(out, [*(train.source.folders if train.source else ()), negatives, *validation.folders])
        self.outputs, self.device = FinetuneOutputs(out), self.group.local_device(device)
        train = train.within(runtime.max_pixels)
        train.check_readable()
        self.size = train.size_for(s.features.image_size)
        self.data = {
            "train": train.source.to_dict() if train.source else train.name,
            "negatives": None if negatives is None else str(Path(negatives).resolve()),
            "validation": validation.to_dict()
            | {k: str(Path(v).resolve()) for k, v in (("photos", validation.photos), ("defects", validation.defects)) if v},
            "input_size": list(self.size),
        }
        if validation.photos is not None and self.data["validation"]["photos"] == self.data["negatives"]:
            log.warning(
                "--validation-photos is the training negatives' folder: the validation then rewards "
                "what the training learnt; pass another photo source"
            )
        self.good, self.valset = self.hold_out(load_images(train.at_size(self.size), desc="load good images"))
        self.fit_index = torch.linspace(0, len(self.good) - 1, min(s.validation_fit_images, len(self.good))).long()
        natural = None if negatives is None else NaturalImages(negatives, image_size=self.size)
        self.sampler = NegativeSampler(natural, self.good, s, s.negative_families or validation.families)
        self.n_noise = sum(s.negative_kinds[i % len(s.negative_kinds)] == "noise" for i in range(s.batch_neg))
        backbone = create_backbone(s.features.backbone, weights=s.features.backbone_weights)
        self.extractor = FeatureExtractor(s.features, backbone=backbone, seed=s.seed).to(self.device)
        self.strategy = STRATEGIES[s.mode](s, self.extractor, self.group, self.device)
        self.state = TrainingState.fresh(s.seed)
        n_diag = min(s.diag_images, len(self.good))
        self.diag_good = self.good[torch.linspace(0, len(self.good) - 1, n_diag).long()]
        self.diag_negatives, self.diag_masks, _ = self.sampler.sample(  # as the first step's: the curriculum's start
            s.diag_images, torch.Generator().manual_seed(s.seed + 1), floor=s.severity_floor(0)
        )
        self.loss = MixtureLoss(s.alpha, temperature=s.temperature)

    def hold_out(self, images: torch.Tensor) -> tuple[torch.Tensor, ValidationSet | None]:
        """The good images to train on, and the validation set made from the held-out ones (None without any)."""
        s, v = self.settings, self.validation
        kept, held = validation_split(len(images), s.validation_share, s.seed, v.max_images)
        if not held:
            if s.validation_share:
                log.warning("too few good images to hold some out: no validation, the last step is kept")
            return images, None
        valset, self.valset_key, self.valset_cached = validation_set(
            self.outputs.folder, images[held], v, s.seed + 2, held, photo_seed=s.seed
        )
        log.info(
            "validation: %d held-out good images, %d anomalous (%s)",
            len(held),
            int(valset.labels.sum()),
            ", ".join(valset.families),
        )
        return images[kept], valset

    # -- set-up on the frozen backbone ---------------------------------------------------------

    def setup(self) -> dict:
        """Fit the projection and the guiding model on the frozen features, calibrate log L, diagnose."""
        s = self.settings
        stage = frozen_stage_features(self.extractor, self.good, "frozen features")  # serves the PCA and the guide
        with torch.no_grad():
            raw = torch.cat([self.extractor.adapt(chunk.to(self.device)).cpu() for chunk in torch.split(stage, 64)])
            self.extractor.fit_projection_on(raw, seed=s.seed)
            features = torch.cat([self.extractor.project(chunk.to(self.device)).cpu() for chunk in torch.split(raw, 64)])
        del raw
        self.strategy.prepare(stage, self.fit_index, self.sampler)
        del stage
        self.guide.fit(features.to(self.device))
        self.guide.to(self.device)
        grid = features.shape[-2:]
        u = flatten_patches(features)
        if self.n_noise:
            values, vectors = torch.linalg.eigh(torch.cov(u.double().T))  # ascending
            low = vectors[:, : max(1, len(values) // 2)]
            self.state.noise_basis = (low * values.clamp_min(0).mean().sqrt()).float().to(self.device)
        good_ld = diagnostics.log_densities(self.guide, u, grid)
        _, neg_u, _ = diagnostics.patch_features(self.extractor, self.diag_negatives, diagnostics.FEATURE_BATCH)
        inside = patch_mask(self.diag_masks, grid)
        if not inside.any():  # negatives smaller than a patch (tiny images): each one's most covered patch calibrates
            log.warning(
                "no negative covers most of a feature patch at %s px: calibrating on their most covered patches", self.size
            )
            inside = most_covered(self.diag_masks, grid)
        neg_ld = diagnostics.log_densities(self.guide, neg_u, grid)[inside]
        if s.temperature == 0:
            self.loss.temperature = auto_temperature(good_ld, neg_ld)
            log.info("temperature (auto): %.3g", self.loss.temperature)
        self.loss.calibrate(boundary_log_density(good_ld, neg_ld, s.calibration, s.boundary_quantile))
        began = time.perf_counter()
        self.state.start = self.diagnose()
        self.state.start["seconds"] = round(time.perf_counter() - began, 2)  # what max_minutes keeps for the end's
        return self.state.start

    def diagnose(self) -> dict:
        s = self.settings
        return diagnostics.weight_summary(
            self.guide,
            self.loss,
            self.extractor,
            self.diag_good,
            self.diag_negatives,
            self.diag_masks,
            s.filter,
            s.filter_fraction,
            s.batch_neg,
        )

    # -- training ------------------------------------------------------------------------------

    def step(self, optimizer: torch.optim.Optimizer) -> dict:
        """One optimisation step; returns its record (loss terms and mean gradient weights).

        Under torchrun every sum below is this process's share and every count the global
        one (see :mod:`.ddp`); on one process the shares are the whole batch.
        """
        s, g, group, state = self.settings, self.state.generator, self.group, self.state
        floor = s.severity_floor(state.step)
        stage, masks, frozen = self.strategy.batch(self.good, self.sampler, s.batch_neg - self.n_noise, g, floor)
        raw = self.extractor.adapt(stage)
        features = self.extractor.project(raw)
        mine = group.share(s.batch_pos)
        b, _, h, w = features.shape
        n_pos = (mine.stop - mine.start) * h * w
        u = flatten_patches(features)
        positions = torch.arange(h * w, device=self.device).repeat(b)
        negative_patches = n_pos + torch.nonzero(patch_mask(masks, (h, w))).flatten().to(self.device)
        context = torch.zeros(0, dtype=torch.long, device=self.device)
        if s.context_positives:  # the untouched patches of the negative images are good ones
            context = n_pos + torch.nonzero(clean_mask(masks, (h, w))).flatten().to(self.device)
        u_neg, neg_positions = u[negative_patches], positions[negative_patches]
        if self.n_noise:  # good patches moved along the guide space's low-variance directions
            source = torch.randint(s.batch_pos, (self.n_noise,), generator=g)
            noise = torch.randn(self.n_noise * h * w, state.noise_basis.shape[1], generator=g).view(self.n_noise, h * w, -1)
            local = (source >= mine.start) & (source < mine.stop)  # the noise negatives of this process's good images
            noisy = u[:n_pos].view(mine.stop - mine.start, h * w, -1)[source[local] - mine.start].flatten(0, 1)
            noise = noise[local].flatten(0, 1).to(self.device) @ state.noise_basis.T
            u_neg = torch.cat([u_neg, noisy + s.noise_scale * noise])
            neg_positions = torch.cat([neg_positions, positions[: h * w].repeat(int(local.sum()))])
        self.guide.online_update(group.gather(u[:n_pos]), positions[: h * w].repeat(s.batch_pos), s.decay)
        positive_patches = torch.cat([torch.arange(n_pos, device=self.device), context])
        ld_pos = self.guide.log_density(u[positive_patches], positions[positive_patches])
        ld_neg = self.guide.log_density(u_neg, neg_positions)
        kept = keep_negatives(
            ld_neg, self.loss, s.filter, s.filter_fraction, population=group.gather(ld_neg) if group.size > 1 else None
        )
        n_all_good, n_all_pos, n_all_neg, n_all_kept = group.sum(
            torch.tensor([n_pos, len(ld_pos), len(ld_neg), len(kept)], dtype=torch.float64)
        ).tolist()
        loss_pos = self.loss.positive(ld_pos).sum() / n_all_pos
        loss_neg = self.loss.negative(ld_neg[kept]).sum() / max(n_all_kept, 1)
        loss = loss_pos + loss_neg
        drift = torch.zeros((), device=self.device)
        if s.trust and frozen is not None:
            drift = (raw[: len(frozen)] - frozen).pow(2).sum(1).sum() / n_all_good / self.frozen_variance(frozen)
            loss = loss + s.trust * drift
        with torch.no_grad():
            p_neg = self.loss.p_inside(ld_neg)
            sums = group.sum(
                torch.stack(
                    [loss, loss_pos, loss_neg, drift, (1 - self.loss.p_inside(ld_pos)).sum(), p_neg.sum(), p_neg[kept].sum()]
                ).double()
            ).tolist()
        if not math.isfinite(sums[0]):
            raise FloatingPointError(f"loss {sums[0]} (L_pos {sums[1]}, L_neg {sums[2]})")
        optimizer.zero_grad(set_to_none=True)
        (loss * group.size).backward()  # DDP averages the processes' gradients: their sum is the global batch's
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.strategy.trained.parameters(), s.clip_grad)
        optimizer.step()
        return {
            "step": state.step + 1,
            "loss": sums[0],
            "loss_pos": sums[1],
            "loss_neg": sums[2],
            "drift": sums[3],
            "p_pos_misclassified": sums[4] / n_all_pos,
            "p_neg_inside": sums[5] / n_all_neg if n_all_neg else 0.0,
            "p_kept_inside": sums[6] / n_all_kept if n_all_kept else 0.0,
        }

    def frozen_variance(self, frozen: torch.Tensor) -> torch.Tensor:
        """The summed per-channel variance of the global batch's frozen good features (the drift's scale)."""
        f = frozen.detach().double()
        c = f.shape[1]
        n, total, squares = self.group.sum(
            torch.cat(
                [torch.tensor([f.numel() / c], dtype=torch.float64, device=f.device), f.sum((0, 2, 3)), (f**2).sum((0, 2, 3))]
            )
        ).split([1, c, c])
        return ((squares - total**2 / n) / (n - 1)).sum().clamp_min(1e-12).float()

    def validate(self) -> None:
        """Score the current features on the validation set; remember them when they are the best so far."""
        if self.valset is None:
            return
        started = time.perf_counter()
        s, state = self.settings, self.state
        fit = self.strategy.features(self.good[self.fit_index], "fit")
        features = self.strategy.features(self.valset.images, "validation")
        result = score_detector(validator_settings(s), fit, features, self.valset)
        record = {"step": state.step, **{k: round(result[k], 5) for k in ("score", "image_auroc", "aupro")}}
        record["families"] = {f: round(m["image_auroc"], 5) for f, m in result["families"].items()}
        state.remember(record, self.strategy.trained.state_dict(), s.min_gain)
        self.validation_seconds = time.perf_counter() - started
        log.info(
            "validation at step %d: %.4f, mean image AUROC over the anomaly families (AUPRO %.4f; best: step %d)",
            state.step,
            result["score"],
            result["aupro"],
            state.best["step"],
        )

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, optimizer: torch.optim.Optimizer) -> dict:
        return {
            "settings": self.settings.to_dict(),
            "extractor": self.extractor.state_dict(),
            "optimizer": optimizer.state_dict(),
            "guide": self.guide.state_dict(),
            "log_volume": self.loss.log_volume,
            "temperature": self.loss.temperature,
            **self.state.to_dict(),
        }

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        saved = self.outputs.load_checkpoint(self.settings)
        self.extractor.load_state_dict(saved["extractor"])
        optimizer.load_state_dict(saved["optimizer"])
        self.guide.load_state_dict(saved["guide"], source=str(self.outputs.checkpoint_path)).to(self.device)
        self.loss.log_volume, self.loss.temperature = saved["log_volume"], saved["temperature"]
        self.state = TrainingState.from_dict(saved)
        self.strategy.resume(self.good, self.fit_index, self.sampler)

    # -- the run ---------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        """Set up (or resume), train, write the fine-tuned backbone and the diagnostics (rank 0 writes, and holds the lock)."""
        with self.outputs.folder.claim() if self.group.is_main else contextlib.nullcontext():
            self.outputs.folder.path.mkdir(parents=True, exist_ok=True)
            if self.group.is_main and self.valset is not None and not self.valset_cached:  # built once: a resume reads it
                self.valset.save(self.outputs.folder, self.valset_key)
            return self._train(resume)

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam on what the mode trains (``lr``, else the mode's own default)."""
        return torch.optim.Adam(self.strategy.trainable(), lr=self.settings.lr or self.strategy.learning_rate)

    def _train(self, resume: bool) -> dict:
        s = self.settings
        optimizer = self.optimizer()
        if self.outputs.has_checkpoint() and resume:
            self.restore(optimizer)
            log.info("resumed from step %d of %s", self.state.step, self.outputs.checkpoint_path)
        elif self.outputs.has_checkpoint() or self.outputs.is_finished():
            raise RunFolderError(
                f"{self.outputs.folder.path} already holds a fine-tuning: pass --resume to continue it, or another --out"
            )
        else:
            if resume:
                log.warning("--resume: %s holds no checkpoint, so the fine-tuning starts from step 0", self.outputs.folder.path)
            self.setup()
            log.info("frozen features:\n%s", diagnostics.summary_text(self.state.start))
            self.validate()
        start = time.perf_counter()
        progress = tqdm(
            range(self.state.step, s.steps),
            desc="fine-tune",
            initial=self.state.step,
            total=s.steps,
            disable=not self.group.is_main,
        )
        for _ in progress:
            step_started = time.perf_counter()
            try:
                record = self.step(optimizer)
            except FloatingPointError as exc:
                raise AnomatuneError(
                    f"fine-tuning stopped at step {self.state.step + 1}: {exc}. The last good checkpoint (step {self.state.step}) "
                    f"is {self.outputs.checkpoint_path}: lower --lr or set --clip-grad, then --resume"
                ) from None
            self.state.step += 1
            self.state.history.append(record)
            progress.set_postfix(
                loss=f"{record['loss']:.3g}",
                pos=f"{record['p_pos_misclassified']:.3f}",
                neg=f"{record['p_neg_inside']:.3f}",
                refresh=False,
            )
            due = self.state.step % s.checkpoint_every == 0 or self.state.step == s.steps
            out_of_time = self.out_of_time(time.perf_counter() - step_started, 2 if due else 1)
            if due or out_of_time:
                self.validate()
                if self.group.is_main:
                    self.outputs.save_checkpoint(self.checkpoint(optimizer))
            if out_of_time:
                log.warning(
                    "stopped at step %d of %d: max_minutes=%g leaves no time for another step, a validation and the outputs",
                    self.state.step, s.steps, s.max_minutes,
                )  # fmt: skip
                break
        return self.finish(time.perf_counter() - start)

    def out_of_time(self, step_seconds: float, validations: int) -> bool:
        """Whether another step would end past ``max_minutes`` (counted from this session's start) with the
        ``validations`` still to come (this step's when due, and the last one) and the outputs (the end's diagnostics
        and figures, counted as twice the start's diagnostics); under torchrun the processes agree (any one out of
        time stops them all, at the same step)."""
        s = self.settings
        if s.max_minutes is None or self.state.step >= s.steps:
            return False
        outputs = 2 * self.state.start.get("seconds", 0.0)
        needed = time.perf_counter() - self.session_start + step_seconds + validations * self.validation_seconds + outputs
        late = torch.tensor([float(needed > 60 * s.max_minutes)], device=self.device)
        return bool(self.group.sum(late).item() > 0)

    def finish(self, seconds: float) -> dict:
        """Keep the best checkpoint (or fall back), write the outputs; rank 0 writes while the others wait."""
        if not self.group.is_main:
            self.group.barrier()
            return {"rank": self.group.rank}
        state, end = self.state, self.diagnose()
        variance_ratio = end["good_feature_variance"] / state.start["good_feature_variance"]
        collapsed = variance_ratio < COLLAPSE_RATIO
        if collapsed:
            log.warning(
                "the good features collapsed (variance x%.2f of the start's): this fine-tuning failed; lower --lr or --steps",
                variance_ratio,
            )
        last = {k: v.detach().cpu() for k, v in self.strategy.trained.state_dict().items()}
        start = create_backbone(self.settings.features.backbone, weights=self.settings.features.backbone_weights)
        if state.best is None:
            self.outputs.write_backbones(self.strategy.backbone_state(start, last), None, fallback=False)
        else:
            kept = self.strategy.backbone_state(start, None if state.fallback else state.best["state"])
            self.outputs.write_backbones(kept, self.strategy.backbone_state(start, last), state.fallback)
        if state.fallback:
            log.warning(
                "no checkpoint beat the frozen features on validation: %s holds the frozen backbone "
                "(the last step's weights are %s)",
                FinetuneFolder.BACKBONE,
                FinetuneFolder.LAST_BACKBONE,
            )
        elif state.best is not None:
            log.info("kept step %d, the best on validation (%s)", state.kept_step, FinetuneFolder.BACKBONE)
        outcome = {"kept_step": state.kept_step, "fallback": state.fallback, "collapsed": collapsed}
        report = {
            "start": state.start,
            "end": end,
            "history": state.history,
            "validation": state.validation,
            "feature_variance_ratio": variance_ratio,
            **outcome,
        }
        kept_validation = next((v for v in state.validation if v["step"] == state.kept_step), None)
        record = {
            "anomatune_version": __version__,
            "kind": "finetune",
            "settings": self.settings.to_dict(),
            "data": self.data,
            "base_weights_id": self.extractor.weights_id,
            "log_volume": self.loss.log_volume,
            "temperature": self.loss.temperature,
            "steps_done": state.step,
            "seconds_this_session": round(seconds, 1),
            **outcome,
            "validation": state.validation and {"frozen": state.validation[0], "kept": kept_validation},
        }
        title = f"{self.size[1]}x{self.size[0]} px: {self.settings.guide.name} guide, {state.step} steps"
        self.outputs.write_report(report, record, title)
        log.info("after fine-tuning:\n%s", diagnostics.summary_text(end))
        self.group.barrier()  # the other processes end once the outputs are written
        return report

    def dry_run(self) -> dict:
        """Set up on the frozen backbone only: the gradient-weight diagnostics, no training."""
        with self.outputs.folder.claim():
            self.outputs.folder.path.mkdir(parents=True, exist_ok=True)
            summary = self.setup()
            self.outputs.write_dry_run(summary)
        return summary


def finetune(
    train: AnomalyDataset,
    negatives,
    out,
    settings: FinetuneSettings | None = None,
    resume: bool = False,
    validation: ValidationSettings | None = None,
    **runtime,
) -> dict:
    """Fine-tune on the good images of ``train`` against ``negatives``; see :class:`Finetuner`."""
    return Finetuner(train, negatives, out, settings, validation, **runtime).run(resume)


def dry_run(
    train: AnomalyDataset,
    negatives,
    out,
    settings: FinetuneSettings | None = None,
    validation: ValidationSettings | None = None,
    **runtime,
) -> dict:
    """The gradient-weight diagnostics on the frozen features, no training (``anomatune finetune --dry-run``)."""
    return Finetuner(train, negatives, out, settings, validation, **runtime).dry_run()
