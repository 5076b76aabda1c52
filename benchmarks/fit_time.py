"""What the cross-fitting costs: ``fit`` with its default threshold (every image scored out of fold) against the same
fit without a threshold (``--threshold-folds 0``), each detector at its default settings, one after the other.

    python benchmarks/fit_time.py                                   # transistor, PaDiM, PatchCore, GLAD
    python benchmarks/fit_time.py --datasets transistor kolektorsdd1 --detectors padim

Writes ``results/fit_time.json`` and ``.md``. Run it on an idle machine: every number is a wall time. The fit without
a threshold is an upper bound of the previous release's fit, which fitted on 90 % of the images and scored the other 10 %.
"""

from __future__ import annotations

import argparse
import time

from anomatune import Pipeline, open_dataset
from anomatune.models.settings import DEFAULT_DETECTOR
from common import DATASETS, dataset, markdown_page, run_record, write_results


def timed_fit(train, detector: str, **changes) -> float:
    start = time.perf_counter()
    Pipeline(detector=detector, device="cpu", **changes).fit(train)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["transistor"], choices=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", default=["padim", "patchcore", DEFAULT_DETECTOR])
    parser.add_argument("--out", default="fit_time")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        root, category = dataset(name)
        train = open_dataset(data=root, category=category)
        for detector in args.detectors:
            without = timed_fit(train, detector, threshold_folds=0)
            cross = timed_fit(train, detector)
            rows.append({"dataset": name, "detector": detector, "images": len(train), "without_threshold_s": without,
                         "cross_fitted_s": cross, "ratio": round(cross / without, 2)})  # fmt: skip
            print(rows[-1], flush=True)
    data = run_record(rows)
    page = markdown_page(
        "What the cross-fitting costs a fit",
        data,
        "default settings, input size 256 short side",
        ("category", "detector", "images", "fit without threshold (s)", "fit, cross-fitted threshold (s)", "ratio"),
        [(r["dataset"], r["detector"], r["images"], r["without_threshold_s"], r["cross_fitted_s"], r["ratio"]) for r in rows],
    )
    write_results(args.out, data, page)


if __name__ == "__main__":
    main()
