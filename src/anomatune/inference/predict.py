"""``anomatune predict``: score image files with a run; a CSV row, an overlay and a mask per image.

This is the local engine (one process); ``anomatune.distributed.batch`` runs the same
:func:`score_paths` in a Ray actor pool. Images stream through in batches (memory stays bounded on any folder size); a file that
cannot be read is a row with its error while the rest are scored. The output folder is
written as one set (staged, then swapped in), so a second prediction into the same
folder replaces the first entirely. Overlays and masks are drawn at each image's own size.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import read_image
from ..data.layouts import open_dataset
from ..data.settings import DataSettings
from ..data.sources import expand_sources
from ..errors import AnomatuneError, DataError
from ..evaluation.plots import heat_overlay
from ..folders.base import refuse_inside
from ..folders.kinds import PredictionsFolder
from ..pipeline.pipeline import Pipeline, check_threshold

log = logging.getLogger(__name__)

COLUMNS = ("path", "score", "normalized_score", "false_alarm_rate", "decision", "threshold", "model", "overlay", "mask", "error")


@dataclass
class PredictionRow:
    """One line of ``results.csv`` (one row of ``results.parquet``): a score and decision, or an error."""

    path: str
    threshold: float
    model: str | None
    score: float | None = None
    normalized_score: float | None = None  # in [0, 1], 0.5 at the run's threshold
    false_alarm_rate: float | None = None  # the share of good parts scoring higher
    decision: str | None = None
    overlay: str | None = None
    mask: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in COLUMNS}


def unique_names(paths: Sequence[Path]) -> list[str]:
    """A file name (without suffix) per path for its overlay and mask: the stem, numbered when taken."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, n = path.stem, 1
        while name in taken:
            name, n = f"{path.stem}_{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def score_paths(
    pipeline: Pipeline, paths: Sequence[Path], names: Sequence[str], threshold: float, images: PredictionsFolder | None
) -> list[PredictionRow]:
    """A row per path, in order (one forward pass); overlay and mask PNGs named ``names`` written into ``images`` when given.

    A file that cannot be read is a row with its error; the others are scored.
    """
    model = getattr(pipeline, "model_id_", None)
    rows: list[PredictionRow] = [
        PredictionRow(str(path), threshold, model) for path in paths
    ]  # by position: a file given twice gets two rows
    readable = []
    for row, path, name in zip(rows, paths, names):
        try:
            readable.append((row, name, read_image(path, max_pixels=pipeline.runtime.max_pixels)))
        except DataError as exc:
            log.error("%s", exc)
            row.decision, row.error = "error", str(exc)
    if not readable:
        return rows
    predictions = pipeline.predict([image for _, _, image in readable], threshold=threshold)
    for n, ((row, name, image), score, label, heat, mask) in enumerate(
        zip(readable, predictions.scores, predictions.labels, predictions.maps, predictions.masks)
    ):
        row.score, row.decision = float(score), "defective" if label else "good"
        if predictions.normalized is not None:
            row.normalized_score, row.false_alarm_rate = float(predictions.normalized[n]), float(predictions.false_alarm_rates[n])
        if images is not None:
            row.overlay, row.mask = f"{PredictionsFolder.OVERLAYS}/{name}.png", f"{PredictionsFolder.MASKS}/{name}.png"
            overlay, mask_image = draw(pipeline, image, heat, mask, predictions.pixel_threshold)
            images.write_image(row.overlay, overlay)
            images.write_image(row.mask, mask_image)
    return rows


def draw(
    pipeline: Pipeline, image: Image.Image, heat: np.ndarray, mask: np.ndarray, threshold: float
) -> tuple[Image.Image, Image.Image]:
    """What a person looks at: the heatmap over the image (blue at the good images' median, red
    from the pixel threshold on) and the defect mask (white = defective), both at the image's size."""
    low = pipeline.fit_record_.good_map_median
    overlay = heat_overlay(np.asarray(image), heat, float(heat.min()) if low is None else low, threshold)
    return Image.fromarray(overlay), Image.fromarray(np.multiply(mask, 255, dtype=np.uint8), "L")


def predict_rows(
    pipeline: Pipeline, paths: Sequence[Path], threshold: float, images: PredictionsFolder | None
) -> Iterator[PredictionRow]:
    """A row per path, in order, batch by batch (memory stays bounded on any number of paths)."""
    names, size = unique_names(paths), pipeline.runtime.batch_size
    for start in range(0, len(paths), size):
        yield from score_paths(pipeline, paths[start : start + size], names[start : start + size], threshold, images)


def input_paths(
    pipeline: Pipeline, run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, data: DataSettings | None = None
) -> list[Path]:
    """The image files to score: ``inputs`` expanded, and the test split of ``data``; with neither, the test split of
    the run's own data. Refused in one line when ``out`` lies in the run or in what is read."""
    if not inputs and (data is None or not data.given):
        data = pipeline.data_
        if data is None:
            raise AnomatuneError(
                f"{run_dir} does not record its data (fitted from Python): give the images to score "
                "(files, folders, patterns or manifests) or the data (--data/--category or --good)"
            )
    data = data if data is not None and data.given else None
    refuse_inside(out, [run_dir, *inputs, *(data.folders if data else ())])
    tests = [record.path for record in open_dataset(data, "test").records] if data else []
    return (expand_sources(inputs) if inputs else []) + tests


def load_for_predict(run_dir: str | Path, threshold: float | None, **runtime) -> tuple[Pipeline, float]:
    """The run's pipeline and the threshold to decide with (the given one, else the learnt one)."""
    pipeline = Pipeline.load(run_dir, **runtime)
    threshold = pipeline.threshold if threshold is None else check_threshold(threshold)
    if threshold is None:
        raise AnomatuneError("this run learnt no threshold (fitted with --threshold-folds 0 or from one image): pass --threshold")
    return pipeline, threshold


def predict(
    run_dir: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    threshold: float | None = None,
    images: bool = True,
    data: DataSettings | None = None,
    **runtime,
) -> list[PredictionRow]:
    """Score every image of ``inputs`` (files, folders, globs, manifests) and of ``data``'s test split (neither: the
    test split of the run's own data) with the run in this process; write ``results.csv`` (and ``overlays/``, ``masks/`` when ``images``) into ``out``
    as one set. ``runtime``: ``device``, ``batch_size``, ``max_pixels``."""
    pipeline, threshold = load_for_predict(run_dir, threshold, **runtime)
    paths = input_paths(pipeline, run_dir, inputs, out, data)
    results = []
    with PredictionsFolder(out).staged() as stage, stage.open_text(PredictionsFolder.RESULTS) as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in tqdm(predict_rows(pipeline, paths, threshold, stage if images else None), total=len(paths), desc="predict"):
            writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row.to_dict().values()])
            results.append(row)
    return results
