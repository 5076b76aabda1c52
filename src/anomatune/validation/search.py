"""``--detector auto``: every candidate scored on the label-free validation set, the best refit on all images.

Like scikit-learn's ``GridSearchCV`` around a :class:`Pipeline`: :class:`DetectorSearch`
holds out a seeded share of the good training images, builds the validation set from
them (:class:`.sets.ValidationSet`), runs the backbone once over every training and
validation image (the union of the candidates' stages, :class:`StageMaps`), fits each
candidate (detector x projection x stages) on the remaining good images and scores the
validation images; then the best candidate is refit as a normal run on every training
image from the same features, and the candidates' table is kept with it (``pipeline.selection_``,
saved in the run as ``selection.json``; ``anomatune report`` shows it). No test image is read.
With ``--search-budget``, candidates whose estimated cost would overrun it are skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import AnomalyDataset, collate
from ..device import resolve_device
from ..errors import AnomatuneError, check_is_fitted
from ..features.backbones import create_backbone
from ..features.extractor import FeatureExtractor, combine_stages, pca_projection, project_features
from ..features.settings import AUTO, NONE, FeatureSettings
from ..folders.base import Folder
from ..folders.kinds import ModelFolder, RunFolder
from ..models.base import Detector
from ..models.registry import create_detector
from ..models.settings import detector_settings
from ..pipeline.pipeline import Pipeline
from ..pipeline.settings import PipelineSettings, RuntimeSettings
from ..schema import flat_settings
from .scoring import detector_outputs, validation_metrics
from .sets import GOOD, ValidationSet, load_images, validation_set, validation_split
from .settings import DEFAULT, FINE, ValidationSettings

log = logging.getLogger(__name__)

PCA_DIM = 64


@dataclass(frozen=True)
class Candidate:
    """One configuration the search compares: a detector (with setting changes), a projection, a stage set."""

    detector: str
    proj: str = NONE  # "none" or "pca"
    stages: str = DEFAULT
    changes: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        proj = f"pca{PCA_DIM}" if self.proj == "pca" else "all"
        return f"{self.detector} {proj} {self.stages}"

    def settings(self, base: PipelineSettings, layers: dict[str, tuple[int, ...]]) -> PipelineSettings:
        """The pipeline settings of this candidate on top of ``base`` (the aggregation resolved as a fit resolves it)."""
        settings = base.updated(
            detector=detector_settings(self.detector, **dict(self.changes)),
            layers=layers[self.stages],
            proj=AUTO if self.proj == "pca" else NONE,  # auto: no projection when there are no more features than PCA_DIM
            proj_dim=PCA_DIM if self.proj == "pca" else None,
        )
        return Pipeline(settings).settings


SEARCH_EM = (("max_patches", 20_000), ("max_iter", 15))  # the mixtures' EM within the search's time budget
# PatchCore's coreset from a sample of 100,000 patches: on all of them (4x as many per image on the fine stages) it took
# 2 minutes on transistor
SEARCH_CORESET = (("coreset_ratio", 0.01), ("max_patches", 100_000))
CANDIDATES = (
    Candidate("padim"),
    Candidate("glad", "pca", changes=SEARCH_EM),
    Candidate("glad", changes=SEARCH_EM),
    Candidate("patchcore", changes=SEARCH_CORESET),
    Candidate("padim", stages=FINE),
    Candidate("glad", "pca", FINE, SEARCH_EM),
    Candidate("patchcore", stages=FINE, changes=SEARCH_CORESET),
)  # GLAD on every feature of the stride-4 stages too would take minutes of EM on 2 CPU cores


def stage_sets(extractor: FeatureExtractor) -> dict[str, tuple[int, ...]]:
    """The backbone's default stages and, for a CNN with a stride-4 stage, the same with it (small defects); only
    the default ones when the weights carry a fine-tuned adaptor (it was trained on those)."""
    sets = {DEFAULT: extractor.layers}
    info = getattr(extractor.model, "feature_info", None)
    if extractor.patch_size == 1 and info is not None and extractor.adaptor is None:
        fine = [i for i, f in enumerate(info) if f["reduction"] == 4]
        if fine and fine[-1] not in extractor.layers:
            sets[FINE] = tuple(sorted({*extractor.layers, fine[-1]}))
    return sets


class StageMaps:
    """Every image's stage maps from one backbone pass over the union of the candidates' stages: any stage set's
    features are combined from them, exactly as that set's own extractor computes them, with no second pass."""

    def __init__(self, extractor: FeatureExtractor, batches: Iterable, desc: str):
        self.extractor = extractor
        device = extractor.mean.device
        per_batch = []
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, leave=False):
                images = (batch["image"] if isinstance(batch, dict) else batch).to(device)
                per_batch.append([m.cpu() for m in extractor.stage_maps(images)])
                self.input_hw = tuple(images.shape[-2:])
        self.maps = [torch.cat(stage) for stage in zip(*per_batch)]

    def __len__(self) -> int:
        return len(self.maps[0])

    def positions(self, view: FeatureView) -> int:
        """The grid positions of ``view``'s features."""
        probe = [self.maps[self.extractor.layers.index(i)][:1, :1] for i in view.layers]
        return combine_stages(probe, self.input_hw, 1, view.aggregation)[0, 0].numel()

    @torch.no_grad()
    def features(self, view: FeatureView, rows: Sequence[int] | None = None, batch_size: int = 32) -> torch.Tensor:
        """The raw features (before any projection) of ``view`` for the images ``rows`` (default: all), on the CPU."""
        rows = torch.arange(len(self)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        where = [self.extractor.layers.index(layer) for layer in view.layers]
        device = self.extractor.mean.device
        chunks = []
        for chunk in torch.split(rows, batch_size):
            maps = [self.maps[i][chunk].to(device) for i in where]
            combined = combine_stages(maps, self.input_hw, self.extractor.pool, view.aggregation)
            chunks.append(self.extractor.adapt(combined).cpu())
        return torch.cat(chunks)


@dataclass(frozen=True)
class FeatureView:
    """What a candidate reads of the shared pass: a stage set and an aggregation (and, in a run, a PCA)."""

    layers: tuple[int, ...]
    aggregation: str

    @classmethod
    def of(cls, features: FeatureSettings) -> FeatureView:
        return cls(tuple(features.layers), features.aggregation)


@dataclass
class CandidateRun:
    """A candidate fitted during the search: its row of the table, its detector, and its outputs on the validation
    images (pixel maps, image scores); :meth:`features` gives any other images' features (a benchmark's test)."""

    candidate: Candidate
    row: dict
    detector: Detector
    extractor: FeatureExtractor
    view: FeatureView
    projection: tuple[torch.Tensor, torch.Tensor] | None
    outputs: tuple[torch.Tensor, torch.Tensor]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        raw = StageMaps(self.extractor, [images], desc="features").features(self.view)
        return raw if self.projection is None else project_features(raw, *self.projection)


class DetectorSearch:
    """Choose a pipeline for a product from its good images only; ``best_`` is the refit winner.

    Args:
        settings: the pipeline settings every candidate starts from (backbone, input size, threshold, ...).
        validation: :class:`ValidationSettings`.
        candidates: the configurations to compare (default: those of :data:`CANDIDATES` whose detector and stage
            set are among the validation's ``detectors`` and ``stages``).
        cache: a folder whose cached validation set is used when it was built with the same recipe (the run
            model folder); :meth:`save` caches it there.
        **changes: settings by their flat names, as :class:`Pipeline` takes them (``image_size=128``,
            ``device="cpu"``), and the validation's (``validation_photos=DIR``).

    Fitted attributes: ``results_`` (one row per candidate, in order), ``best_candidate_``, ``best_``.
    """

    fitted_attribute = "best_"

    def __init__(
        self,
        settings: PipelineSettings | None = None,
        validation: ValidationSettings | None = None,
        candidates: Sequence[Candidate] | None = None,
        cache: Folder | None = None,
        **changes: Any,
    ):
        keys = {kind: {flat.key for flat in flat_settings(kind)} for kind in (RuntimeSettings, ValidationSettings)}
        self.runtime = RuntimeSettings().updated(**{k: v for k, v in changes.items() if k in keys[RuntimeSettings]})
        self.validation = (validation or ValidationSettings()).updated(
            **{k: v for k, v in changes.items() if k in keys[ValidationSettings]}
        )
        rest = {k: v for k, v in changes.items() if k not in keys[RuntimeSettings] | keys[ValidationSettings]}
        self.settings = (settings or PipelineSettings()).updated(**rest)
        self.candidates = tuple(
            [c for c in CANDIDATES if c.detector in self.validation.detectors and c.stages in self.validation.stages]
            if candidates is None
            else candidates
        )
        if not self.candidates:
            raise AnomatuneError("the detector search needs at least one candidate")
        self.cache = cache

    def check_is_fitted(self) -> None:
        check_is_fitted(self, "call fit(dataset) first")

    def prepare(self, dataset: AnomalyDataset) -> tuple[AnomalyDataset, list[int], ValidationSet]:
        """The training images at their input size, those the candidates fit on, and the validation set."""
        s, v = self.settings, self.validation
        dataset = dataset.within(self.runtime.max_pixels)
        dataset.check_readable()
        resized = dataset.at_size(dataset.size_for(s.features.image_size))
        kept, held = validation_split(len(resized), v.share, v.seed, v.max_images)
        if not held:
            raise AnomatuneError(
                f"{len(resized)} good training images are too few to hold some out for --detector auto: "
                "give at least 4, or fix a detector (--detector padim)"
            )
        fit_index = (
            kept if len(kept) <= v.fit_images else [kept[i] for i in torch.linspace(0, len(kept) - 1, v.fit_images).long()]
        )
        good = load_images(resized.subset(held), desc="validation images")
        valset, self.validation_key_, _ = validation_set(
            self.cache, good, v, v.seed, [str(resized.records[i].path) for i in held]
        )
        log.info(
            "validation: %d held-out good images, %d anomalous (%s); candidates fitted on %d images",
            len(held),
            int(valset.labels.sum()),
            ", ".join(valset.families),
            len(fit_index),
        )
        return resized, fit_index, valset

    def stage_maps(self, resized: AnomalyDataset, valset: ValidationSet) -> tuple[StageMaps, StageMaps]:
        """One backbone pass over the training images (every one: the final fit reads them too) and the validation
        images, for the union of the candidates' stage sets; sets ``layers_`` (the stage sets by name)."""
        s = self.settings
        backbone = create_backbone(s.features.backbone, weights=s.features.backbone_weights)
        default = FeatureExtractor(s.features, backbone=backbone, seed=s.seed)
        self.layers_ = {k: v for k, v in stage_sets(default).items() if k in {c.stages for c in self.candidates}}
        union = tuple(sorted({layer for layers in self.layers_.values() for layer in layers}))
        extractor = default if union == default.layers else FeatureExtractor(s.features, backbone=backbone, layers=union)
        extractor = extractor.to(resolve_device(self.runtime.device)).eval()
        loader = DataLoader(resized, batch_size=self.runtime.batch_size, collate_fn=collate)
        train = StageMaps(extractor, loader, "train features")
        validation = StageMaps(extractor, torch.split(valset.images, self.runtime.batch_size), "validation features")
        return train, validation

    def runs(
        self, train: StageMaps, fit_index: Sequence[int], validation: StageMaps, valset: ValidationSet, start: float
    ) -> Iterator[CandidateRun]:
        """Each candidate fitted on the ``fit_index`` images of ``train`` and scored on the validation, in turn; with
        a budget, those whose estimated cost would end the search past it (counted from ``start``, a
        ``time.perf_counter()``) are skipped and listed in ``skipped_``. One view's features are held at a time."""
        s = self.settings
        device = resolve_device(self.runtime.device)
        budget = self.validation.budget
        self.skipped_: list[dict] = []
        held: dict[FeatureView, tuple[torch.Tensor, torch.Tensor]] = {}
        projections: dict[tuple[FeatureView, int], tuple[torch.Tensor, torch.Tensor]] = {}
        work_done = seconds_done = 0.0
        for candidate in (c for c in self.candidates if c.stages in self.layers_):
            settings = candidate.settings(s, self.layers_)
            view = FeatureView.of(settings.features)
            raw_dim = sum(train.extractor.stage_channels[train.extractor.layers.index(i)] for i in view.layers)
            proj_dim = settings.features.proj_dim
            if proj_dim is not None and proj_dim >= raw_dim:  # --proj auto: no projection to as many dimensions
                proj_dim = None
            work = settings.detector.work(proj_dim or raw_dim, train.positions(view), len(fit_index), len(valset))
            if budget is not None and work_done:
                estimate = work * seconds_done / work_done
                if time.perf_counter() - start + estimate > budget:
                    self.skipped_.append({"candidate": candidate.name, "estimated_seconds": round(estimate, 1)})
                    log.info("%s: skipped (about %.0f s, over the %.0f s budget)", candidate.name, estimate, budget)
                    continue
            if view not in held:
                held.clear()
                held[view] = (train.features(view, fit_index), validation.features(view))
            fit_raw, val_raw = held[view]
            projection = None
            if proj_dim is not None:
                if (view, proj_dim) not in projections:
                    projections[view, proj_dim] = pca_projection(fit_raw, proj_dim, seed=s.seed)
                projection = projections[view, proj_dim]

            def project(raw: torch.Tensor, projection=projection) -> torch.Tensor:
                return raw.to(device) if projection is None else project_features(raw, *projection).to(device)

            began = time.perf_counter()
            detector = create_detector(settings.detector).fit(project(fit_raw))
            outputs = detector_outputs(detector, project(val_raw), valset.images.shape[-2:], s.postprocess)
            row = {"candidate": candidate.name, **validation_metrics(valset, *outputs)}
            row["seconds"] = round(time.perf_counter() - began, 1)
            work_done, seconds_done = work_done + work, seconds_done + row["seconds"]
            log.info("%s: validation %.4f (%.1f s)", candidate.name, row["score"], row["seconds"])
            yield CandidateRun(candidate, row, detector, train.extractor, view, projection, outputs)

    def fit(self, dataset: AnomalyDataset) -> DetectorSearch:
        """Score every candidate on the validation set built from ``dataset``'s good images; refit the best on all."""
        start = time.perf_counter()
        resized, fit_index, valset = self.prepare(dataset)
        train, validation = self.stage_maps(resized, valset)
        results = [(run.candidate, run.row) for run in self.runs(train, fit_index, validation, valset, start)]
        del validation
        if not results:
            raise AnomatuneError("no candidate applies to this backbone (or fits in the search budget): choose a detector")
        best_candidate, best_row = max(results, key=lambda pair: pair[1]["score"])  # the first of equals: the cheaper
        log.info("chose %s (validation %.4f); refitting it on every training image", best_candidate.name, best_row["score"])
        self.results_ = [row for _, row in results]
        self.best_candidate_ = best_candidate
        searched = time.perf_counter() - start
        settings = best_candidate.settings(self.settings, self.layers_)
        raw = train.features(FeatureView.of(settings.features))
        del train
        best = Pipeline(settings, **self.runtime.to_dict()).fit(dataset, raw_features=raw)
        n_held = int((np.array(valset.groups) == GOOD).sum())
        best.selection_ = self.selection(best_candidate, n_held, len(fit_index), searched)
        self.best_, self.valset_ = best, valset
        return self

    def save(self, folder: str | Path) -> RunFolder:
        """Save the winner as a new version of the model at ``folder``, with the candidates' table; the validation set
        is cached in the model's folder (for a refit)."""
        self.check_is_fitted()
        run = self.best_.save(folder)
        model = ModelFolder(folder)
        with model.lock():
            self.valset_.save(model, self.validation_key_)
        return run

    def selection(self, winner: Candidate, n_held: int, n_fit: int, seconds: float) -> dict:
        """What the run records of the search: the table, the winner and why."""
        ranked = sorted(self.results_, key=lambda r: -r["score"])
        runner_up = ranked[1] if len(ranked) > 1 else None
        why = f"highest validation score ({ranked[0]['score']:.4f}, mean image AUROC over the anomaly families)"
        if runner_up is not None:
            why += f"; next: {runner_up['candidate']} ({runner_up['score']:.4f})"
        return {
            "winner": winner.name,
            "why": why,
            "validation": {
                "held_out_good_images": n_held,
                "families": list(self.validation.families) + (["real"] if self.validation.defects else []),
                "fit_images": n_fit,
                "seed": self.validation.seed,
            },
            "candidates": self.results_,
            "skipped": self.skipped_,
            "search_seconds": round(seconds, 1),
        }
