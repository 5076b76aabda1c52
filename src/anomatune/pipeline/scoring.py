"""Every image of a labelled split through a fitted pipeline, and the split's metrics.

Below ``evaluation`` (which writes them to a run folder) so that ``Pipeline.score`` and the
benchmarks use the same loop without importing upwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import AnomalyDataset, collate
from ..metrics import PixelCurves, pixel_curves, split_metrics

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass
class ScoredSplit:
    """A pipeline's outputs on a labelled split, at its input size, with the metrics."""

    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None
    paths: list[str]
    images: torch.Tensor | None
    seconds: float
    metrics: dict[str, float]
    curves: PixelCurves | None


def score_dataset(pipeline: Pipeline, dataset: AnomalyDataset, keep_images: bool = False) -> ScoredSplit:
    """Every image of ``dataset`` through ``pipeline.forward``, batch by batch, and the metrics."""
    test = dataset.at_size(pipeline.input_size).within(pipeline.runtime.max_pixels)
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
    metrics = split_metrics(labels_np, scores_np, curves, pipeline.threshold)
    images_kept = torch.cat(images) if keep_images else None
    return ScoredSplit(labels_np, scores_np, maps_np, masks_np, paths, images_kept, seconds, metrics, curves)
