"""The fine-tuning loop: Adam on the backbone, guided by an online density model.

Each step takes ``batch_pos`` good training images and ``batch_neg`` negatives (natural
crops colour-mapped onto good images, whole or pasted into them); the guiding model (GMM, GLAD or PaDiM, fitted on the frozen features in
the fixed projection space) first follows the detached good features by online EM,
then scores both: loss = mean L_pos over good patches + mean L_neg over the negatives
kept by the outlier filter. Batch-norm statistics stay frozen.

A run folder gets ``checkpoint.pt`` every ``checkpoint_every`` steps (written to a
temporary file, then renamed; read back with ``weights_only=True``) and, at the end,
``backbone.safetensors`` (the whole backbone, usable by ``fit --backbone-weights``),
``finetune.yaml``, ``diagnostics.json`` and the figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..backbones import FINETUNED_WEIGHTS, create_backbone
from ..data import MVTecAD, NaturalImages, collate
from ..errors import AnomatuneError
from ..features import FeatureExtractor
from ..models import create_detector
from ..models.base import flatten_patches
from ..runs import _atomic_write
from . import diagnostics
from .loss import MixtureLoss, auto_temperature, boundary_log_density, keep_negatives
from .negatives import NegativeSampler, patch_mask
from .settings import FinetuneSettings, check_settings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
COLLAPSE_RATIO = 0.25  # good-feature variance falling below this share of the start's is a collapse


def _load_images(dataset, batch_size: int = 16) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return torch.cat([batch["image"] for batch in tqdm(loader, desc="load good images", leave=False)])


def _flip(images: torch.Tensor, flip: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal and/or vertical flips, one draw per image and axis."""
    for axis, letter in ((-1, "h"), (-2, "v")):
        if letter in flip:
            flipped = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(axis), images)
    return images


class Finetuner:
    """One fine-tuning run: set-up on the frozen backbone, steps, checkpoints, outputs."""

    def __init__(self, data, category: str, negatives, out, settings: FinetuneSettings | None = None, device="cpu"):
        self.settings = s = settings or FinetuneSettings()
        problems = check_settings(s)
        if problems:
            raise AnomatuneError("; ".join(problems))
        self.out, self.device = Path(out), torch.device(device)
        self.data = {"root": str(Path(data).resolve()), "category": category, "negatives": str(Path(negatives).resolve())}
        torch.manual_seed(s.seed)
        train = MVTecAD(data, category, "train", image_size=s.image_size)
        self.good = _load_images(train)
        self.sampler = NegativeSampler(NaturalImages(negatives, image_size=s.image_size), self.good, s.rho_min, s.crop_min,
                                       s.color_method, s.negative_mode, s.paste_min, s.paste_max)
        self.extractor = FeatureExtractor(create_backbone(s.backbone), layers=s.layer_tuple(), pool=s.pool,
                                          proj_dim=s.proj_dim or None, proj=s.proj, seed=s.seed).to(self.device)
        self.weights_id = self.extractor.weights_id
        self.generator = torch.Generator().manual_seed(s.seed)
        n_diag = min(s.diag_images, len(self.good))
        self.diag_good = self.good[torch.linspace(0, len(self.good) - 1, n_diag).long()]
        self.diag_negatives, self.diag_masks = self.sampler.sample(s.diag_images, torch.Generator().manual_seed(s.seed + 1))
        guide_settings = {"ridge": s.ridge, "normalize": False}
        if s.model != "padim":
            guide_settings |= {"n_components": s.n_components, "seed": s.seed}
        self.guide = create_detector(s.model, **guide_settings)
        self.loss = MixtureLoss(s.alpha, temperature=s.temperature)
        self.history: list[dict] = []
        self.step_done = 0
        self.start_summary: dict | None = None

    # -- set-up on the frozen backbone ---------------------------------------------------------

    def setup(self) -> dict:
        """Fit the projection and the guiding model on the frozen features, calibrate log L, diagnose."""
        s = self.settings
        if s.proj_dim and s.proj == "pca":
            self.extractor.fit_projection(torch.split(self.good, 8), seed=s.seed)
        with torch.no_grad():
            features = torch.cat([self.extractor.eval()(chunk.to(self.device)).cpu() for chunk in
                                  tqdm(torch.split(self.good, 8), desc="frozen features", leave=False)])
        self.guide.fit(features.to(self.device))
        self.guide.to(self.device)
        grid = features.shape[-2:]
        good_ld = diagnostics.log_densities(self.guide, flatten_patches(features), grid, self.device)
        _, neg_u, _ = diagnostics.patch_features(self.extractor, self.diag_negatives, self.device)
        neg_ld = diagnostics.log_densities(self.guide, neg_u, grid, self.device)[patch_mask(self.diag_masks, grid)]
        if s.temperature == 0:
            self.loss.temperature = auto_temperature(good_ld, neg_ld)
            log.info("temperature (auto): %.3g", self.loss.temperature)
        self.loss.calibrate(boundary_log_density(good_ld, neg_ld, s.calibration, s.boundary_quantile))
        self.start_summary = self.diagnose()
        return self.start_summary

    def diagnose(self) -> dict:
        s = self.settings
        return diagnostics.weight_summary(self.guide, self.loss, self.extractor, self.diag_good, self.diag_negatives, self.diag_masks,
                                          self.device, s.filter, s.filter_fraction, s.batch_neg)

    # -- training ------------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
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
        self.guide.online_update(u[:n_pos].detach(), positions[:n_pos], decay=s.decay)
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

    def _checkpoint_state(self, optimizer) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step_done, "settings": asdict(self.settings),
                "extractor": self.extractor.state_dict(), "optimizer": optimizer.state_dict(),
                "guide": {k: v.cpu() for k, v in self.guide.state.items()}, "log_volume": self.loss.log_volume,
                "temperature": self.loss.temperature,
                "generator": self.generator.get_state(), "history": self.history, "start": self.start_summary}

    def save_checkpoint(self, optimizer) -> None:
        state = self._checkpoint_state(optimizer)
        _atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, optimizer) -> None:
        path = self.out / CHECKPOINT
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AnomatuneError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise AnomatuneError(f"{path}: checkpoint of another format; delete it to start over")
        mine = asdict(self.settings) | {"steps": None}
        theirs = state["settings"] | {"steps": None}
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise AnomatuneError(f"{path}: the checkpoint was made with other settings ({', '.join(changed)}); "
                                 "resume with the same settings (only --steps may change) or use another --out")
        self.extractor.load_state_dict(state["extractor"])
        optimizer.load_state_dict(state["optimizer"])
        self.guide.load_state_dict({k: v.to(self.device) for k, v in state["guide"].items()})
        self.loss.log_volume, self.loss.temperature = state["log_volume"], state["temperature"]
        self.generator.set_state(state["generator"])
        self.history, self.step_done, self.start_summary = state["history"], state["step"], state["start"]

    def run(self, resume: bool = False) -> dict:
        """Set up (or resume), train, write the fine-tuned backbone and the diagnostics."""
        s = self.settings
        self.out.mkdir(parents=True, exist_ok=True)
        optimizer = self._optimizer()
        if (self.out / CHECKPOINT).exists():
            if not resume:
                raise AnomatuneError(f"{self.out} already holds a fine-tuning checkpoint: pass --resume to continue it, or another --out")
            self.load_checkpoint(optimizer)
            log.info("resumed from step %d of %s", self.step_done, self.out / CHECKPOINT)
        else:
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
                    f"is {self.out / CHECKPOINT}: lower --lr or set --clip-grad, then --resume"
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
        """The whole backbone (pruned stages restored from the pretrained weights) as safetensors."""
        full = create_backbone(self.settings.backbone).model
        full.load_state_dict(self.extractor.model.state_dict(), strict=False)
        state = {k: v.detach().cpu().contiguous() for k, v in full.state_dict().items()}
        path = self.out / FINETUNED_WEIGHTS
        _atomic_write(path, lambda tmp: save_file(state, tmp))
        return path

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
        _atomic_write(self.out / "diagnostics.json", lambda tmp: Path(tmp).write_text(json.dumps(report)))
        config = {"anomatune_version": __version__, "kind": "finetune", "settings": asdict(self.settings), "data": self.data,
                  "base_weights_id": self.weights_id, "log_volume": self.loss.log_volume, "temperature": self.loss.temperature, "steps_done": self.step_done,
                  "seconds_this_session": round(seconds, 1), "collapsed": collapsed}
        _atomic_write(self.out / "finetune.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))
        title = f"{self.data['category']}: {self.settings.model}, {self.step_done} steps"
        diagnostics.save_weight_figure(self.start_summary, end, self.out / "finetune_weights.png", title)
        diagnostics.save_loss_figure(self.history, self.out / "finetune_loss.png")
        log.info("after fine-tuning:\n%s", diagnostics.describe(end))
        return report


def finetune(data, category: str, negatives, out, settings: FinetuneSettings | None = None, device="cpu",
             resume: bool = False) -> dict:
    """Fine-tune the backbone on ``data/category`` against ``negatives``; see :class:`Finetuner`."""
    return Finetuner(data, category, negatives, out, settings, device).run(resume)


def dry_run(data, category: str, negatives, out, settings: FinetuneSettings | None = None, device="cpu") -> dict:
    """Set up on the frozen backbone only: the gradient-weight diagnostics, no training."""
    tuner = Finetuner(data, category, negatives, out, settings, device)
    summary = tuner.setup()
    Path(out).mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(out) / "dry_run.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    diagnostics.save_weight_figure(summary, None, Path(out) / "dry_run_weights.png", f"{category}: frozen features")
    return summary
