"""Evaluate a fitted pipeline on a labelled test split: metrics, curves, heatmaps, a gallery.

Pixel metrics are computed at the pipeline's input size (ground-truth masks resized with
nearest neighbour), like anomalib. Two F1 figures: at the learnt threshold (from good
training images only) and at the F1-optimal threshold, which is *tuned on the test
labels*, named so in the output: optimistic by construction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import AnomalyDataset, collate
from ..data.layouts import describe, open_dataset
from ..data.settings import DataSettings
from ..errors import DataError
from ..pipeline.folders import RunFolder
from ..pipeline.pipeline import Pipeline
from . import plots
from .metrics import PixelCurves, f1_at, f1_optimal_threshold, image_auroc, pixel_curves, pixel_metrics

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A pipeline's outputs on a test split, at its input size, with the metrics."""

    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None
    paths: list[str]
    images: torch.Tensor | None
    seconds: float
    metrics: dict[str, float]
    curves: PixelCurves | None


def test_metrics(labels: np.ndarray, scores: np.ndarray, curves: PixelCurves | None, threshold: float | None) -> dict[str, float]:
    """Image AUROC, pixel AUROC, AUPRO; the test-tuned F1; the F1 at the learnt threshold."""
    metrics = {"image_auroc": image_auroc(labels, scores)} | pixel_metrics(curves)
    if labels.min() != labels.max():
        tuned, best_f1 = f1_optimal_threshold(labels, scores)
        metrics |= {"f1_threshold_tuned_on_test": tuned, "f1_tuned_on_test": best_f1}
    if threshold is not None:
        metrics |= {"learnt_threshold": threshold, "f1_at_learnt_threshold": f1_at(labels, scores, threshold)}
    return metrics


def score_dataset(pipeline: Pipeline, dataset: AnomalyDataset, keep_images: bool = False) -> Evaluation:
    """Every image of ``dataset`` through ``pipeline.forward``, batch by batch, and the metrics."""
    test = dataset.at_size(pipeline.input_size)
    loader = DataLoader(test, batch_size=pipeline.runtime.batch_size, collate_fn=collate)
    maps, scores, labels, masks, paths, images = [], [], [], [], [], []
    start = time.perf_counter()
    for batch in tqdm(loader, desc="test images", leave=False):
        batch_maps, batch_scores = pipeline.forward(batch["image"])
        maps.append(batch_maps)
        scores.append(batch_scores)
        labels.append(batch["label"])
        masks.append(batch["mask"])
        paths += batch["path"]
        if keep_images:
            images.append(batch["image"])
    seconds = time.perf_counter() - start
    maps_np, scores_np, labels_np = torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(labels).numpy()
    masks_np = torch.cat(masks).numpy().astype(bool)[:, 0] if all(m is not None for m in masks) else None
    curves = pixel_curves(masks_np, maps_np)
    metrics = test_metrics(labels_np, scores_np, curves, pipeline.threshold)
    return Evaluation(labels_np, scores_np, maps_np, masks_np, paths, torch.cat(images) if keep_images else None, seconds, metrics, curves)


def evaluate(run_dir: str | Path, data: DataSettings | None = None, figures: bool = True, pipeline: Pipeline | None = None,
             **runtime) -> dict:
    """Score the run's test split (or ``data``'s) and write ``evaluation/`` in the run folder as one set.

    ``evaluation/`` holds ``metrics.json`` (``null`` where a metric does not apply),
    ``metrics.md`` and, with ``figures``, ``roc.png``, ``pro.png``, ``heatmaps.png`` and the
    gallery. ``pipeline``: the run's pipeline already in memory (``fit --evaluate``), else
    it is loaded with ``runtime`` (``device``, ``batch_size``). Returns the metrics.
    """
    run = RunFolder(run_dir)
    pipeline = pipeline if pipeline is not None else Pipeline.load(run.path, **runtime)
    data = data if data is not None and data.given else pipeline.data_
    if data is None:
        raise DataError(f"{run.path} does not record its data (fitted from Python): pass the test data (--data/--category or --good/--defect)")
    test = open_dataset(data, "test", image_size=pipeline.input_size)
    evaluation = score_dataset(pipeline, test, keep_images=figures)
    settings = pipeline.settings
    result = {
        "run": str(run.path),
        "category": describe(data),
        "detector": settings.detector.name,
        "backbone": settings.features.backbone,
        "backbone_weights": settings.features.backbone_weights,
        "input_size": list(pipeline.input_size),
        "n_test": len(test),
        **{k: round(v, 4) for k, v in evaluation.metrics.items()},
        "test_images_per_s": round(len(test) / evaluation.seconds, 2),
        "fit_seconds": pipeline.fit_record_.fit_seconds,
    }
    with run.lock(), run.evaluation.staged("evaluation", lock=False) as stage:
        stage.write_json(RunFolder.METRICS, result)
        stage.write_text(RunFolder.METRICS_TABLE, metrics_table(result))
        if figures:
            write_figures(stage, evaluation, pipeline.threshold)
    log.info("evaluation written to %s", run.evaluation.path)
    return result


def metrics_table(result: dict) -> str:
    rows = "\n".join(f"| {k} | {'n/a' if isinstance(v, float) and not np.isfinite(v) else v} |" for k, v in result.items())
    return "| metric | value |\n|---|---|\n" + rows + "\n"


def write_figures(stage: RunFolder, evaluation: Evaluation, threshold: float | None) -> None:
    """ROC, PRO, heatmaps and the gallery (at the learnt threshold, else the test-tuned one, else the median score)."""
    for name, figure in ((RunFolder.ROC, plots.roc_figure(evaluation.labels, evaluation.scores)),
                         (RunFolder.PRO, plots.pro_figure(evaluation.curves)),
                         (RunFolder.HEATMAPS, plots.heatmaps_figure(evaluation))):
        if figure is not None:
            stage.write_figure(name, figure, dpi=80 if name == RunFolder.HEATMAPS else 100)
    if threshold is None:
        threshold = evaluation.metrics.get("f1_threshold_tuned_on_test", float(np.median(evaluation.scores)))
    entries = []
    for n, (panel, entry) in enumerate(plots.gallery(evaluation, threshold)):
        name = f"{RunFolder.GALLERY}/{n:02d}.png"
        stage.write_image(name, panel)
        entries.append({"image": name, **entry})
    stage.write_json(RunFolder.GALLERY_INDEX, {"threshold": threshold, "entries": entries})
