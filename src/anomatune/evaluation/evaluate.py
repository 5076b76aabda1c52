"""Evaluate a fitted pipeline on a labelled test split: metrics, curves, heatmaps, a gallery.

Pixel metrics are computed at the pipeline's input size (ground-truth masks resized with
nearest neighbour), like anomalib. Two F1 figures: at the learnt threshold (from good
training images only) and at the F1-optimal threshold, which is *tuned on the test
labels*, named so in the output: optimistic by construction.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data.layouts import data_name, open_dataset
from ..data.settings import DataSettings
from ..errors import DataError
from ..folders.kinds import EvaluationFolder, open_run
from ..pipeline.pipeline import Pipeline
from ..pipeline.scoring import ScoredSplit, score_dataset
from . import plots

log = logging.getLogger(__name__)


def evaluate(
    run_dir: str | Path, data: DataSettings | None = None, figures: bool = True, pipeline: Pipeline | None = None, **runtime
) -> dict:
    """Score the run's test split (or ``data``'s) and write ``evaluation/`` in the run folder as one set.

    ``evaluation/`` holds ``metrics.json`` (``null`` where a metric does not apply),
    ``metrics.md``, ``images.json`` (each test image's scores and verdict: the report's table and what-if threshold) and, with ``figures``, ``roc.png``, ``pro.png``, ``heatmaps.png`` and the
    gallery. ``pipeline``: the run's pipeline already in memory (``fit --evaluate``), else
    it is loaded with ``runtime`` (``device``, ``batch_size``). Returns the metrics.
    """
    run = open_run(run_dir)
    pipeline = pipeline if pipeline is not None else Pipeline.load(run.path, **runtime)
    data = data if data is not None and data.given else pipeline.data_
    if data is None:
        raise DataError(
            f"{run.path} does not record its data (fitted from Python): pass the test data (--data/--category or --good/--defect)"
        )
    test = open_dataset(data, "test", image_size=pipeline.input_size)
    evaluation = score_dataset(pipeline, test, keep_images=figures)
    settings = pipeline.settings
    result = {
        "run": str(run.path),
        "category": data_name(data),
        "detector": settings.detector.name,
        "backbone": settings.features.backbone,
        "backbone_weights": settings.features.backbone_weights,
        "input_size": list(pipeline.input_size),
        "n_test": len(test),
        **{k: round(v, 4) for k, v in evaluation.metrics.items()},
        "test_images_per_s": round(len(test) / evaluation.seconds, 2),
        "fit_seconds": getattr(pipeline, "fit_seconds_", None),  # known in the process that fitted it
    }
    with run.lock(), run.evaluation.staged(lock=False) as stage:
        stage.write_json(EvaluationFolder.METRICS, result)
        stage.write_text(EvaluationFolder.METRICS_TABLE, metrics_table(result))
        stage.write_json(EvaluationFolder.IMAGES, image_rows(pipeline, evaluation))
        if figures:
            write_figures(stage, evaluation, pipeline.threshold)
    log.info("evaluation written to %s", run.evaluation.path)
    return result


def image_rows(pipeline: Pipeline, evaluation: ScoredSplit) -> dict:
    """Every test image's ground truth (the folder it lies in, 0 good / 1 defective), score, calibrated scores and
    verdict at the run's threshold, and the calibration that turns a score into the calibrated ones."""
    calibration = pipeline.image_calibration
    threshold = pipeline.threshold
    normalized = calibration.normalized(evaluation.scores) if calibration else [None] * len(evaluation.scores)
    rates = calibration.false_alarm_rate(evaluation.scores) if calibration else [None] * len(evaluation.scores)
    rows = [
        {
            "path": path,
            "kind": Path(path).parent.name,
            "label": int(label),
            "score": float(score),
            "normalized_score": None if n is None else float(n),
            "false_alarm_rate": None if r is None else float(r),
            "decision": None if threshold is None else ("defective" if score > threshold else "good"),
        }
        for path, label, score, n, r in zip(evaluation.paths, evaluation.labels, evaluation.scores, normalized, rates)
    ]
    return {"threshold": threshold, "calibration": calibration.to_dict() if calibration else None, "images": rows}


def metrics_table(result: dict) -> str:
    rows = "\n".join(f"| {k} | {'n/a' if isinstance(v, float) and not np.isfinite(v) else v} |" for k, v in result.items())
    return "| metric | value |\n|---|---|\n" + rows + "\n"


def write_figures(stage: EvaluationFolder, evaluation: ScoredSplit, threshold: float | None) -> None:
    """ROC, PRO, heatmaps and the gallery (at the learnt threshold, else the test-tuned one, else the median score)."""
    for name, figure in (
        (EvaluationFolder.ROC, plots.roc_figure(evaluation.labels, evaluation.scores)),
        (EvaluationFolder.PRO, plots.pro_figure(evaluation.curves)),
        (EvaluationFolder.HEATMAPS, plots.heatmaps_figure(evaluation)),
    ):
        if figure is not None:
            stage.write_figure(name, figure, dpi=80 if name == EvaluationFolder.HEATMAPS else 100)
    if threshold is None:
        threshold = evaluation.metrics.get("f1_threshold_tuned_on_test", float(np.median(evaluation.scores)))
    entries = []
    for n, (panel, entry) in enumerate(plots.gallery(evaluation, threshold)):
        name = f"{EvaluationFolder.GALLERY}/{n:02d}.png"
        stage.write_image(name, panel)
        entries.append({"image": name, **entry})
    stage.write_json(EvaluationFolder.GALLERY_INDEX, {"threshold": threshold, "entries": entries})
