"""Where good images' maps peak: the share of unseen good test images whose highest pixel lies in a border band.

A map without a border effect puts a good image's peak in the band about as often as the band's share of the image.

    python benchmarks/border.py                                    # transistor, GLAD, PaDiM, PatchCore
    python benchmarks/border.py --datasets transistor elpv_mono --detectors padim --sigma 0
    python benchmarks/border.py --detectors padim glad --aggregation stage --out border_stage

Writes ``results/border.json`` and ``.md``. Input size 256x256, default settings, no threshold (the maps only).
"""

from __future__ import annotations

import argparse

import numpy as np

from anomatune import Pipeline, open_dataset
from anomatune.models.settings import DEFAULT_DETECTOR
from anomatune.pipeline.scoring import score_dataset
from common import DATASETS, SQUARE, dataset, markdown_page, run_record, write_results


def band_mask(h: int, w: int, band: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["transistor"], choices=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", default=[DEFAULT_DETECTOR, "padim", "patchcore"])
    parser.add_argument("--band", type=int, default=16, help="border band width in pixels of the input size")
    parser.add_argument("--sigma", type=float, default=4.0, help="the maps' smoothing (0: none)")
    parser.add_argument("--aggregation", default="auto", choices=("auto", "stage", "concat"), help="the features' aggregation")
    parser.add_argument("--out", default="border")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        root, category = dataset(name)
        for detector in args.detectors:
            pipeline = Pipeline(detector=detector, device="cpu", image_size=SQUARE, threshold_folds=0, sigma=args.sigma,
                                aggregation=args.aggregation)  # fmt: skip
            pipeline.fit(open_dataset(data=root, category=category))
            scored = score_dataset(pipeline, open_dataset(data=root, category=category, split="test"))
            maps = scored.maps[scored.labels == 0]
            border = band_mask(*maps.shape[1:], args.band)
            peaks = maps.reshape(len(maps), -1).argmax(1)
            rows.append({"dataset": name, "detector": detector, "good_images": len(maps),
                         "peaks_in_band": float(border.reshape(-1)[peaks].mean()), "band_area": float(border.mean())})  # fmt: skip
            print(rows[-1], flush=True)
    data = run_record(rows)
    page = markdown_page(
        "Where good images' maps peak",
        data,
        f"band {args.band} px of 256, sigma {args.sigma}, aggregation {args.aggregation}",
        ("category", "detector", "good test images", "peaks in the border band", "the band's area"),
        [(r["dataset"], r["detector"], r["good_images"], f"{r['peaks_in_band']:.0%}", f"{r['band_area']:.0%}") for r in rows],
    )
    write_results(args.out, data, page)


if __name__ == "__main__":
    main()
