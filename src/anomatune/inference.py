"""Score new images with a fitted run: anomaly score, good/defective decision, overlay and mask PNGs.

Images stream through in batches (memory stays bounded on any folder size); a file that
cannot be read is reported in ``results.csv`` and skipped while the rest are scored.
The decision threshold is the run's (learnt at fit time from held-out good images) or
the caller's. A pixel is drawn as defective when its smoothed score exceeds the same
threshold, so an image is "defective" exactly when its mask is not empty.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, image_to_tensor, list_images, read_image
from .errors import AnomatuneError, DataError
from .plots import heat_overlay
from .runs import Run, load_run

log = logging.getLogger(__name__)

COLUMNS = ("path", "score", "decision", "threshold", "overlay", "mask", "error")


@dataclass
class Prediction:
    path: str
    score: float | None = None
    decision: str | None = None
    overlay: str | None = None
    mask: str | None = None
    error: str | None = None


def collect_images(inputs) -> list[Path]:
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


class Predictor:
    """A loaded run that scores image files (see :func:`predict`)."""

    def __init__(self, run: Run | str | Path, threshold: float | None = None, device="cpu"):
        self.run = run if isinstance(run, Run) else load_run(run, device)
        self.device = device
        learnt = self.run.config.get("threshold") or {}
        self.threshold = threshold if threshold is not None else learnt.get("value")
        if self.threshold is None:
            raise AnomatuneError("this run learnt no threshold (fitted with threshold_holdout=0 or too few images): pass --threshold")
        self.low = learnt.get("good_map_median")

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel maps at the run's image size and image scores for a ``(B, 3, H, W)`` batch in [0, 1]."""
        features = self.run.extractor(images.to(self.device))
        maps, scores = self.run.detector.predict(features, self.run.image_size, self.run.config["sigma"])
        return maps.cpu(), scores.cpu()

    def __call__(self, paths, out: Path | None = None, batch_size: int = 8):
        """Yield a :class:`Prediction` per path, writing overlay and mask PNGs in ``out``."""
        names: set[str] = set()
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded, results = [], []
            for path in chunk:
                try:
                    loaded.append((path, read_image(path)))
                except DataError as exc:
                    log.error("%s", exc)
                    results.append(Prediction(str(path), error=str(exc)))
            if loaded:
                maps, scores = self.score(torch.stack([image_to_tensor(img, self.run.image_size) for _, img in loaded]))
                for (path, img), heat, score in zip(loaded, maps, scores):
                    results.append(self._describe(path, img, heat, float(score), out, names))
            yield from sorted(results, key=lambda r: chunk.index(Path(r.path)))

    def _describe(self, path: Path, img: Image.Image, heat: torch.Tensor, score: float, out: Path | None, names: set) -> Prediction:
        result = Prediction(str(path), score, "defective" if score > self.threshold else "good")
        if out is None:
            return result
        name, n = path.stem, 1
        while name in names:
            name, n = f"{path.stem}_{n}", n + 1
        names.add(name)
        full = F.interpolate(heat[None, None], size=(img.height, img.width), mode="bilinear", align_corners=False)[0, 0].numpy()
        low = self.low if self.low is not None else float(full.min())
        result.overlay, result.mask = f"overlays/{name}.png", f"masks/{name}.png"
        Image.fromarray(heat_overlay(np.asarray(img), full, low, self.threshold)).save(out / result.overlay)
        Image.fromarray(((full > self.threshold) * 255).astype(np.uint8), "L").save(out / result.mask)
        return result


def predict(run_dir, inputs, out, threshold: float | None = None, batch_size: int = 8, device="cpu") -> list[Prediction]:
    """Score every image of ``inputs`` (files or folders) with the run; write PNGs and ``results.csv`` in ``out``."""
    predictor = Predictor(run_dir, threshold, device)
    paths = collect_images(inputs)
    out = Path(out)
    for sub in ("overlays", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results = []
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for result in tqdm(predictor(paths, out, batch_size), total=len(paths), desc="predict"):
            writer.writerow([result.path, "" if result.score is None else f"{result.score:.6g}", result.decision or "error",
                             f"{predictor.threshold:.6g}", result.overlay or "", result.mask or "", result.error or ""])
            f.flush()
            results.append(result)
    return results
