"""Decisions from good images only: the false-alarm rate asked against the one realised on unseen good parts.

On each category, for 20, 40, 100 and all of its good training images (three seeded draws of which images; one
for all), each detector is fitted as ``anomatune fit`` fits it: every image fitted on, every image scored out of fold,
and the threshold set at a target false-alarm rate of 1 % and 5 % (one fit, both rates). On the category's unseen
test images: the realised false-alarm rate (good images flagged) and the share of defects caught at that threshold.
Beside it, the threshold of the previous release on the same draw: 10 % of the images held out of the fit (seeded), the
0.99 quantile of their scores; and the share of defects the new model catches at the false-alarm rate that threshold
realised (the ranking compared at an equal rate).

    python benchmarks/calibration.py                                       # the six, default detector, PaDiM, PatchCore
    python benchmarks/calibration.py --datasets transistor --detectors padim --sizes 40
    python benchmarks/calibration.py --table calibration.json              # the Markdown again from the results
    python benchmarks/calibration.py --merge calibration_a.json calibration_b.json   # runs in parallel, one table
                                                                      # (a later file's rows replace an earlier one's)

Writes ``results/calibration.json`` and ``.md``. Input size 256x256 (the benchmarks' square protocol), the default
backbone; PatchCore with the detector search's coreset (1 % of at most 100,000 patches; the default takes up to 27 min
a fit here). Each image's backbone features are computed once per category and reused by every fit (the features of an
image do not depend on the other images), so the fits run through the real ``Pipeline.fit``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomatune import Pipeline, open_dataset
from anomatune.calibration import ScoreCalibration
from anomatune.data.datasets import seeded_split
from anomatune.models.settings import DEFAULT_DETECTOR, detector_settings
from anomatune.pipeline.scoring import score_dataset
from anomatune.validation.search import SEARCH_CORESET
from common import DATASETS, RESULTS, SQUARE, command_line, dataset, features_once, write_results

DETECTORS = [DEFAULT_DETECTOR, "padim", "patchcore"]
SIZES = [20, 40, 100, None]  # None: every training image
RATES = [0.01, 0.05]
DRAWS = 3
DETECTOR_SETTINGS = {"patchcore": dict(SEARCH_CORESET)}
PREVIOUS_HOLDOUT, PREVIOUS_QUANTILE = 0.1, 0.99  # the previous release's threshold


def rates_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(share of good images flagged, share of defects caught) at ``threshold``."""
    flagged = scores > threshold
    return float(flagged[labels == 0].mean()), float(flagged[labels == 1].mean())


def catch_at_rate(scores: np.ndarray, labels: np.ndarray, rate: float) -> float:
    """The share of defects caught by the threshold that flags ``rate`` of the good images (the same count)."""
    good = np.sort(scores[labels == 0])[::-1]
    flagged = int(round(rate * len(good)))
    threshold = good[flagged] if flagged < len(good) else -np.inf
    return float((scores[labels == 1] > threshold).mean())


def pipeline_for(detector: str, seed: int, **changes) -> Pipeline:
    settings = detector_settings(detector, **DETECTOR_SETTINGS.get(detector, {}))
    return Pipeline(detector=settings, image_size=SQUARE, device="cpu", seed=seed, **changes)


def run_category(name: str, detectors, sizes) -> list[dict]:
    root, category = dataset(name)
    train = open_dataset(data=root, category=category)
    test = open_dataset(data=root, category=category, split="test")
    rows = []
    with features_once():
        for size in sizes:
            n = len(train) if size is None or size >= len(train) else size
            for draw in range(1 if n == len(train) else DRAWS):
                chosen = sorted(seeded_split(len(train), n, draw)[1]) if n < len(train) else list(range(len(train)))
                images = train.subset(chosen)
                for detector in detectors:
                    began = time.perf_counter()
                    pipeline = pipeline_for(detector, draw).fit(images)
                    fit_seconds = time.perf_counter() - began
                    scored = score_dataset(pipeline, test)
                    oof = pipeline.calibration_["scores"]
                    kept, held = seeded_split(len(images), max(1, round(PREVIOUS_HOLDOUT * len(images))), draw)
                    previous = pipeline_for(detector, draw, threshold_folds=0).fit(images.subset(kept))
                    held_scores = previous.predict([images.records[i].path for i in held]).scores
                    previous_threshold = float(np.quantile(held_scores, PREVIOUS_QUANTILE))
                    previous_scored = score_dataset(previous, test)
                    previous_far, previous_catch = rates_at(previous_scored.scores, previous_scored.labels, previous_threshold)
                    for rate in RATES:
                        calibration = ScoreCalibration.fit(oof, rate, seed=draw)
                        far, catch = rates_at(scored.scores, scored.labels, calibration.threshold)
                        rows.append(
                            {
                                "dataset": name,
                                "detector": detector,
                                "n_train": n,
                                "draw": draw,
                                "target_rate": rate,
                                "realised_rate": far,
                                "caught": catch,
                                "threshold": calibration.threshold,
                                "expected_rate": calibration.rate_at_threshold,
                                "interval": list(calibration.interval),
                                "previous_rate": previous_far,
                                "previous_caught": previous_catch,
                                "caught_at_previous_rate": catch_at_rate(scored.scores, scored.labels, previous_far),
                                "image_auroc": scored.metrics["image_auroc"],
                                "fit_seconds": round(fit_seconds, 1),
                                "n_test_good": int((scored.labels == 0).sum()),
                            }
                        )
                    print(
                        f"{name} {detector} n={n} draw {draw}: "
                        + ", ".join(f"{r['target_rate']:.0%}→{r['realised_rate']:.3f}/{r['caught']:.2f}" for r in rows[-2:])
                        + f"; previous {previous_far:.3f}/{previous_catch:.2f} ({fit_seconds:.0f} s)",
                        flush=True,
                    )
    return rows


def table(data: dict) -> str:
    rows = data["rows"]
    lines = [
        "# Thresholds from good images: asked vs realised false-alarm rate",
        "",
        f"`{data['command']}`",
        "",
        "Realised false-alarm rate on each category's unseen good test images (mean over the categories measured, the worst one) "
        "and defects caught at that threshold; each category's value is the mean over its draws. *previous*: 10 % held "
        "out, the 0.99 quantile of their scores, on the same draw; *caught at previous rate*: the new model's catch at "
        "the false-alarm rate the previous threshold realised.",
        "",
        "| detector | images | target | categories | realised (mean) | worst category | caught (mean) | previous realised | previous caught | caught at previous rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["detector"], r["n_train"] if r["n_train"] in SIZES else "all", r["target_rate"]) for r in rows},
                  key=lambda k: (k[0], 10**9 if k[1] == "all" else k[1], k[2]))  # fmt: skip
    for detector, size, rate in keys:
        chosen = [r for r in rows if r["detector"] == detector and r["target_rate"] == rate
                  and (r["n_train"] if r["n_train"] in SIZES else "all") == size]  # fmt: skip
        per = {}
        for r in chosen:
            per.setdefault(r["dataset"], []).append(r)
        mean = {k: {m: float(np.mean([r[m] for r in v])) for m in ("realised_rate", "caught", "previous_rate", "previous_caught",
                                                                   "caught_at_previous_rate")} for k, v in per.items()}  # fmt: skip
        worst = max(mean, key=lambda k: mean[k]["realised_rate"])
        avg = {m: np.mean([v[m] for v in mean.values()]) for m in next(iter(mean.values()))}
        lines.append(
            f"| {detector} | {size} | {rate:.0%} | {len(mean)} | {avg['realised_rate']:.1%} | {mean[worst]['realised_rate']:.1%} ({worst}) | "
            f"{avg['caught']:.1%} | {avg['previous_rate']:.1%} | {avg['previous_caught']:.1%} | {avg['caught_at_previous_rate']:.1%} |"
        )
    lines += ["", f"Categories: {', '.join(sorted({r['dataset'] for r in rows}))}. Machine: {data['machine']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", default=DETECTORS)
    parser.add_argument("--sizes", nargs="+", default=["20", "40", "100", "all"])
    parser.add_argument("--out", default="calibration", help="results/OUT.json and .md")
    parser.add_argument("--table", help="only write the Markdown again from results/FILE")
    parser.add_argument("--merge", nargs="+", help="only join results/FILE... (runs in parallel) into results/OUT")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.table:
        data = json.loads((RESULTS / args.table).read_text())
        (RESULTS / args.table).with_suffix(".md").write_text(table(data))
        return
    if args.merge:
        parts = [json.loads((RESULTS / name).read_text()) for name in args.merge]
        key = lambda r: (r["dataset"], r["detector"], r["n_train"], r["draw"], r["target_rate"])  # noqa: E731
        rows = {key(row): row for p in parts for row in p["rows"]}  # a later file's row replaces an earlier one's
        data = {"command": " && ".join(p["command"] for p in parts), "machine": parts[0]["machine"],
                "rows": list(rows.values())}  # fmt: skip
        write_results(args.out, data, table(data))
        return
    sizes = [None if s == "all" else int(s) for s in args.sizes]
    torch.set_num_threads(args.threads)
    rows = []
    data = {
        "command": command_line(),
        "machine": f"2-core CPU, {torch.get_num_threads()} torch thread(s) per process",
        "rows": rows,
    }
    for name in args.datasets:
        rows += run_category(name, args.detectors, sizes)
        write_results(args.out, data, table(data))  # after each category: a killed run keeps what it measured


if __name__ == "__main__":
    main()
