"""Where is the paper's mechanism alive? Gradient-weight diagnostics on the frozen features.

For each setting (a lever of METHOD.md §4), ``dry_run`` fits the guiding model on the
frozen features of the training images and reports, on 16 good and 16 colour-mapped
negative images: the share of negative patches with gradient weight P(z=+|u−) > 0.01,
the share in (0.01, 1/2], the share of filter-kept negatives with weight > 0.01, and the
share of good patches outside the boundary. No training: about 15 s per row.
Writes ``benchmarks/results/finetune_levers.json`` and ``.md``.

    python benchmarks/finetune_levers.py
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

from anomatune import open_dataset
from anomatune.finetune import FinetuneSettings, dry_run
from common import DATASETS, FIRST_TWO, NEGATIVES, RESULTS, SQUARE
from common import dataset as dataset_path

# The paper's settings (quantile calibration, no temperature, fraction filter, whole-photo negatives); each row changes them.
PAPER = {"calibration": "quantile", "temperature": 1.0, "filter": "fraction", "negative_mode": "photos"}
LEVERS = [
    {},
    {"proj_dim": None},
    {"proj_dim": 16},
    {"proj_dim": 64},
    {"guide": "glad"},
    {"guide": "padim"},
    {"calibration": "midpoint"},
    {"temperature": 4.0},
    {"temperature": 16.0},
    {"temperature": 64.0},
    {"filter": "threshold", "temperature": 16.0},
    {"rho_min": 1.0},
    {"crop_min": 0.05},
]
COLUMNS = [
    "negative_visible_share",
    "negative_band_share",
    "kept_visible_share",
    "good_outside_share",
    "median_log_density_good",
    "median_log_density_negative",
    "boundary",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=FIRST_TWO, choices=list(DATASETS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for dataset in args.datasets:
        root, category = dataset_path(dataset)
        train = open_dataset(data=root, category=category)
        for lever in LEVERS:
            settings = FinetuneSettings().updated(image_size=SQUARE, **(PAPER | lever))
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                summary = dry_run(train, NEGATIVES, tmp, settings)
            row = {
                "dataset": dataset,
                "lever": lever,
                **{k: round(summary[k], 4) for k in COLUMNS},
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(row, flush=True)
            rows.append(row)
            write(rows)


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_levers.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "Command: `python benchmarks/finetune_levers.py` (rows: changes from the paper's settings, PCA-32 GMM guide, 16 good + 16 negative images).",
        "",
        "| dataset | change from the paper's settings | neg > 0.01 | band (0.01, 1/2] | kept > 0.01 | good outside | median log GMM good / neg | boundary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lever = ", ".join(f"{k}={v}" for k, v in r["lever"].items()) or "none (the paper's)"
        lines.append(
            f"| {r['dataset']} | {lever} | {r['negative_visible_share']:.3f} | {r['negative_band_share']:.3f} | "
            f"{r['kept_visible_share']:.3f} | {r['good_outside_share']:.3f} | "
            f"{r['median_log_density_good']:.1f} / {r['median_log_density_negative']:.1f} | {r['boundary']:.1f} |"
        )
    (RESULTS / "finetune_levers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
