"""Frozen feature sources for each detector: DINOv2 ViT-S/14 (patch 14, at 224 and 448 px) beside EfficientNet-Lite0
(256 px), on the six development categories.

Each (backbone, input size) is fitted with PaDiM, GLAD on PCA-64 features and PatchCore (the detector search's EM and
coreset settings, so that a 768-dimensional source stays practical on 2 CPU cores) on every good training image, as
``anomatune fit`` fits it, and scored on the test split: image AUROC and AUPRO. PaDiM reads PCA-128 features of
DINOv2 (768 dimensions per position: 2.4 GB of covariances at 32x32 positions), all of Lite0's. Each image's features are
computed once per backbone and size (``common.features_once``).

    python benchmarks/frozen_backbones.py                              # the six
    python benchmarks/frozen_backbones.py --datasets transistor --sources dinov2_vits14@224

Writes ``results/frozen_backbones.json`` and ``.md``; a run is resumable per category (``--out`` names its files).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomatune import Pipeline, open_dataset
from anomatune.models.settings import detector_settings
from anomatune.pipeline.scoring import score_dataset
from anomatune.validation.search import SEARCH_CORESET, SEARCH_EM
from common import DATASETS, RESULTS, dataset, features_once, markdown_page, run_record, write_results

SOURCES = ["efficientnet_lite0@256", "dinov2_vits14@224", "dinov2_vits14@448"]
DETECTORS = {  # name: (detector, its settings, its features' projection)
    "padim": ("padim", (), {"proj": "none"}),
    "glad pca64": ("glad", SEARCH_EM, {"proj": "pca", "proj_dim": 64}),
    "patchcore": ("patchcore", SEARCH_CORESET, {"proj": "none"}),
}
PADIM_ON_DINOV2 = {"proj": "pca", "proj_dim": 128}


def fit_and_score(name: str, source: str, threads: int, detectors: list[str]) -> list[dict]:
    backbone, size = source.split("@")
    root, category = dataset(name)
    train = open_dataset(data=root, category=category)
    test = open_dataset(data=root, category=category, split="test")
    rows = []
    torch.set_num_threads(threads)
    with features_once():
        for label in detectors:
            detector, changes, features = DETECTORS[label]
            if detector == "padim" and backbone.startswith("dinov2"):
                features = PADIM_ON_DINOV2
            pipeline = Pipeline(detector=detector_settings(detector, **dict(changes)), backbone=backbone,
                                image_size=f"{size}x{size}", device="cpu", **features)  # fmt: skip
            began = time.perf_counter()
            pipeline.fit(train)
            fit_seconds = time.perf_counter() - began
            scored = score_dataset(pipeline, test)
            row = {
                "dataset": name,
                "source": source,
                "detector": label,
                "features": pipeline.extractor_.proj_dim or pipeline.extractor_.raw_dim,
                "image_auroc": scored.metrics["image_auroc"],
                "aupro": scored.metrics.get("aupro", float("nan")),
                "fit_seconds": round(fit_seconds, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(data: dict) -> str:
    rows = data["rows"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    names = [n for n in DATASETS if any(r["dataset"] == n for r in rows)]
    cells = []
    for detector in DETECTORS:
        for source in sources:
            found = {r["dataset"]: r for r in rows if r["source"] == source and r["detector"] == detector}
            if not found:
                continue
            image = [found[n]["image_auroc"] if n in found else float("nan") for n in names]
            aupro = [
                found[n]["aupro"]
                for n in names
                if n in found and found[n]["aupro"] is not None and np.isfinite(found[n]["aupro"])
            ]
            mean = (
                f"**{np.mean(image):.3f}**"
                if len(found) == len(names)
                else f"{np.nanmean(image):.3f} ({len(found)} of {len(names)})"
            )
            cells.append((detector, source, *("—" if np.isnan(v) else f"{v:.3f}" for v in image), mean,
                          f"{np.mean(aupro):.3f}" if aupro else "", f"{np.mean([r['fit_seconds'] for r in found.values()]):.0f}"))  # fmt: skip
    return markdown_page(
        "Frozen feature sources: DINOv2-S beside EfficientNet-Lite0",
        data,
        "inputs squashed to a square; test image AUROC per category, its mean (over the categories run, with their "
        "count where a row lacks some), the mean AUPRO over the categories with masks and the mean fit time (s, with "
        "cross-fitted threshold); every good training image fitted on",
        ("detector", "source", *names, "mean", "mean AUPRO", "fit s"),
        cells,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sources", nargs="+", default=SOURCES, help="BACKBONE@SIZE")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="frozen_backbones")
    args = parser.parse_args()
    path = RESULTS / f"{args.out}.json"
    done = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = list(done)
    for name in args.datasets:
        for source in args.sources:
            todo = [
                d
                for d in args.detectors
                if not any(r["dataset"] == name and r["source"] == source and r["detector"] == d for r in done)
            ]
            if todo:
                rows += fit_and_score(name, source, args.threads, todo)
            data = run_record(rows)
            write_results(args.out, data, table(data))


if __name__ == "__main__":
    main()
