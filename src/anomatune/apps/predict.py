"""``anomatune predict``: score image files with a run; a CSV row, an overlay and a mask per image.

Images stream through in batches (memory stays bounded on any folder size); a file that
cannot be read is a row with its error while the rest are scored. The output folder is
written as one set (staged, then swapped in), so a second prediction into the same
folder replaces the first entirely. Overlays and masks are drawn at each image's own size.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data.images import IMAGE_EXTENSIONS, list_images, read_image
from ..errors import AnomatuneError, DataError
from ..evaluation.plots import heat_overlay
from ..pipeline.folders import RunFolder
from ..pipeline.pipeline import Pipeline, check_threshold

log = logging.getLogger(__name__)

COLUMNS = ("path", "score", "decision", "threshold", "overlay", "mask", "error")


@dataclass
class PredictionRow:
    """One line of ``results.csv``."""

    path: str
    score: float | None = None
    decision: str | None = None
    overlay: str | None = None
    mask: str | None = None
    error: str | None = None


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images; a missing path is an error up front."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += list_images(item, recursive=True)
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item} does not exist: pass image files or folders of images")
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, inputs))}")
    return paths


def _unique_name(path: Path, taken: set[str]) -> str:
    name, n = path.stem, 1
    while name in taken:
        name, n = f"{path.stem}_{n}", n + 1
    taken.add(name)
    return name


def predict_rows(pipeline: Pipeline, paths: Sequence[Path], stage: RunFolder, threshold: float) -> Iterator[PredictionRow]:
    """A row per path, in order, batch by batch; overlay and mask PNGs written into ``stage``."""
    taken: set[str] = set()
    low = pipeline.fit_record_.good_map_median
    for start in range(0, len(paths), pipeline.runtime.batch_size):
        chunk = paths[start : start + pipeline.runtime.batch_size]
        rows: list[PredictionRow | None] = [None] * len(chunk)  # by position: a file given twice gets two rows
        readable = []
        for i, path in enumerate(chunk):
            try:
                readable.append((i, path, read_image(path)))
            except DataError as exc:
                log.error("%s", exc)
                rows[i] = PredictionRow(str(path), error=str(exc))
        if readable:
            predictions = pipeline.predict([image for _, _, image in readable], threshold=threshold)
            for (i, path, image), score, label, heat, mask in zip(readable, predictions.scores, predictions.labels,
                                                                   predictions.maps, predictions.masks):
                name = _unique_name(path, taken)
                row = PredictionRow(str(path), float(score), "defective" if label else "good",
                                    f"{RunFolder.OVERLAYS}/{name}.png", f"{RunFolder.MASKS}/{name}.png")
                overlay = heat_overlay(np.asarray(image), heat, float(heat.min()) if low is None else low, threshold)
                stage.write_image(row.overlay, Image.fromarray(overlay))
                stage.write_image(row.mask, Image.fromarray((mask * 255).astype(np.uint8), "L"))
                rows[i] = row
        yield from rows


def predict(run_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, threshold: float | None = None,
            **runtime) -> list[PredictionRow]:
    """Score every image of ``inputs`` (files or folders) with the run; write ``results.csv``,
    ``overlays/`` and ``masks/`` into ``out`` as one set. ``runtime``: ``device``, ``batch_size``."""
    pipeline = Pipeline.load(run_dir, **runtime)
    threshold = pipeline.threshold if threshold is None else check_threshold(threshold)
    if threshold is None:
        raise AnomatuneError("this run learnt no threshold (fitted with threshold_holdout=0 or too few images): pass --threshold")
    paths = collect_images(inputs)
    results = []
    with RunFolder(out).staged("predictions") as stage, stage.open_text(RunFolder.RESULTS) as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in tqdm(predict_rows(pipeline, paths, stage, threshold), total=len(paths), desc="predict"):
            writer.writerow([row.path, "" if row.score is None else f"{row.score:.6g}", row.decision or "error",
                             f"{threshold:.6g}", row.overlay or "", row.mask or "", row.error or ""])
            results.append(row)
    return results
