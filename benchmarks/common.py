"""What every benchmark shares: where ../shared/data is, its two categories, where results go."""

from __future__ import annotations

import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"transistor": (SHARED / "mvtec", "transistor"), "magnetic_tile": (SHARED / "mtd", "magnetic_tile")}
NEGATIVES = SHARED / "natural" / "imagenet_samples"
RESULTS = Path(__file__).parent / "results"


def dataset(name: str) -> tuple[Path, str]:
    """(root, category) of a benchmark dataset; exits with the reason when ../shared/data is absent."""
    root, category = DATASETS[name]
    if not (root / category).exists():
        sys.exit(f"{root / category} is absent: this benchmark needs ../shared/data beside the checkout")
    return root, category
