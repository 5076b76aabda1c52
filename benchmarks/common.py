"""What every benchmark shares: where ../shared/data is, its categories, where results go, scoring cached features."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# ../shared/data beside the checkout, or ANOMATUNE_DATA (e.g. a copy of part of it on a lent GPU machine)
SHARED = Path(os.environ.get("ANOMATUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = {
    "transistor": (SHARED / "mvtec", "transistor"),
    "magnetic_tile": (SHARED / "mtd", "magnetic_tile"),
    "kolektorsdd1": (SHARED / "more", "kolektorsdd1"),
    "bsdata_pitting": (SHARED / "more", "bsdata_pitting"),
    "loco_juice_bottle_logical": (SHARED / "more", "loco_juice_bottle_logical"),
    "elpv_mono": (SHARED / "more", "elpv_mono"),
}
FIRST_TWO = ["transistor", "magnetic_tile"]  # the categories of the tables committed before the other four arrived
NEGATIVES = SHARED / "natural" / "imagenet_samples"
RESULTS = Path(__file__).parent / "results"
SQUARE = "256x256"  # anomalib's protocol (and these tables'): every image resized to a 256 px square


def dataset(name: str) -> tuple[Path, str]:
    """(root, category) of a benchmark dataset; exits with the reason when ../shared/data is absent."""
    root, category = DATASETS[name]
    if not (root / category).exists():
        sys.exit(f"{root / category} is absent: this benchmark needs ../shared/data beside the checkout")
    return root, category


def score_features(detector, features, size_hw, batch: int = 16):
    """Pixel maps and image scores of cached test features, through the pipeline's post-processing."""
    import torch

    from anomatune.pipeline.postprocess import PostProcessor
    from anomatune.pipeline.settings import PostprocessSettings

    post = PostProcessor(PostprocessSettings(), size_hw)
    maps, scores = zip(*(post(*detector.detect(chunk)) for chunk in torch.split(features, batch)))
    return torch.cat(maps).cpu().numpy(), torch.cat(scores).cpu().numpy()


def write_results(name: str, data: dict, markdown: str) -> None:
    """``results/NAME.json`` and ``results/NAME.md``."""
    import json

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
