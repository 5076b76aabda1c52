"""How the detectors' defaults were chosen: settings swept on cached frozen features.

Features of each (dataset, layers, projection) are extracted once; every detector
setting is then fitted and evaluated on them. Writes ``benchmarks/results/settings.json``
and ``settings.md``.

    python benchmarks/settings.py
    python benchmarks/settings.py --only glad --datasets transistor magnetic_tile ...   # one detector's defaults, full vs PCA-64
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from anomatune.allocator import tune_allocator
from anomatune.data import MVTecAD, collate
from anomatune.features import FeatureExtractor
from anomatune.metrics import pixel_curves, split_metrics
from anomatune.models import create_detector
from common import DATASETS, FIRST_TWO, RESULTS, SQUARE, command_line, score_features
from common import dataset as dataset_path

OLD_GMM = {"n_components": 16, "ridge": 1e-3, "max_patches": 20_000, "normalize": False}
DETECTOR_GRID = [
    ("gmm", OLD_GMM),
    ("gmm", {"normalize": False}),
    ("gmm", {}),
    ("glad", OLD_GMM | {"floor": 1e-3}),
    ("glad", {"floor": 1e-3, "normalize": False}),
    ("glad", {"normalize": False}),
    ("glad", {}),
    ("padim", {}),
    ("padim", {"normalize": True}),
]
# (layers, PCA dimension or None); the default is the first
FEATURE_GRID = [((2, 3), None), ((2, 3), 64)]
LAYER_GRID = [((1, 2, 3), None), ((2, 3, 4), None), ((2,), None), ((3,), None)]


def features(dataset: str, layers: tuple[int, ...], proj_dim: int | None) -> tuple[torch.Tensor, dict]:
    """Train features, and test features with labels and masks, on the 256 px square protocol."""
    root, category = dataset_path(dataset)
    train, test = (MVTecAD(root, category, split, image_size=SQUARE) for split in ("train", "test"))
    extractor = FeatureExtractor("efficientnet_lite0", layers=layers, proj_dim=proj_dim, proj="pca").eval()
    extractor.fit_projection(DataLoader(train, batch_size=8, collate_fn=collate))
    batches = list(DataLoader(test, batch_size=8, collate_fn=collate))
    return extractor.extract(DataLoader(train, batch_size=8, collate_fn=collate)), {
        "features": extractor.extract(batches),
        "labels": test.labels,
        "masks": None if test.has_masks is False else torch.cat([b["mask"] for b in batches]).numpy().astype(bool)[:, 0],
        "size": test.size_hw,
    }


def evaluate(name: str, settings: dict, train: torch.Tensor, test: dict) -> dict:
    start = time.perf_counter()
    detector = create_detector({"name": name, **settings}).fit(train)
    fit_seconds = time.perf_counter() - start
    maps, scores = score_features(detector, test["features"], test["size"])
    metrics = split_metrics(test["labels"], scores, pixel_curves(test["masks"], maps))
    # a metric that does not apply (no masks) is null, as in metrics.json
    return {k: round(v, 4) if v == v else None for k, v in metrics.items()} | {"fit_seconds": round(fit_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=FIRST_TWO, choices=list(DATASETS))
    parser.add_argument(
        "--only",
        choices=sorted({name for name, _ in DETECTOR_GRID}),
        help="Only this detector's defaults on the feature grid (writes settings_ONLY.json/.md).",
    )
    args = parser.parse_args()
    for name in args.datasets:
        dataset_path(name)  # exits early when ../shared/data is absent
    tune_allocator()  # as the command line does
    rows = []
    grid = [(args.only, {})] if args.only else DETECTOR_GRID
    plans = [(d, layers, proj, grid) for d in args.datasets for layers, proj in FEATURE_GRID]
    if not args.only:
        plans += [("transistor", layers, proj, [("padim", {})]) for layers, proj in LAYER_GRID]
    for dataset, layers, proj, grid in plans:
        train, test = features(dataset, layers, proj)
        for name, settings in grid:
            row = {
                "dataset": dataset,
                "layers": list(layers),
                "pca": proj,
                "detector": name,
                "settings": settings,
                **evaluate(name, settings, train, test),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = command_line()
    RESULTS.mkdir(exist_ok=True)
    out = f"settings_{args.only}" if args.only else "settings"
    (RESULTS / f"{out}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Detector settings on frozen efficientnet_lite0 features",
        "",
        f"Command: `{command}` (2-core CPU). Settings not listed are the defaults.",
        "",
        "| dataset | layers | PCA | detector | settings | image AUROC | pixel AUROC | AUPRO | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        lines.append(
            f"| {r['dataset']} | {','.join(map(str, r['layers']))} | {r['pca'] or '-'} | {r['detector']} | {settings} | "
            + " | ".join("n/a" if r[k] is None else f"{r[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro"))
            + f" | {r['fit_seconds']} |"
        )
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
