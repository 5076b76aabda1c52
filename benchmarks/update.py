"""``anomatune update`` against a refit, and drift you can see before the AUROC falls.

1. Update vs refit: on each category, 30 % of the good training images (a seeded draw)
   are held back as "the line's new good images". Each detector is fitted on the other
   70 % (``threshold_folds=0``: no threshold, the MVTec protocol), then (a) refit from scratch on all of
   them (the 70 % first, then the 30 %: the order a streamed fit sees) and (b) updated with
   the 30 % (``Pipeline.update``: the old images are not read again). Seconds (features
   included) and the test metrics of the 70 % fit, the refit and the update.
2. Drift: PaDiM fitted on all of transistor's good images (a 10 % held out: the calibration
   scores); the test images darkened step by step (pixel values × factor, a lamp that ages).
   At each step the KS statistic of the good test images' scores against the calibration
   scores (what ``serve`` reports at ``/metrics``), the share of them over the threshold,
   and the image AUROC of the whole shifted test set.

    python benchmarks/update.py                                   # transistor, kolektorsdd1, elpv_mono
    python benchmarks/update.py --datasets transistor --models padim --no-drift
    python benchmarks/update.py --table update.json              # the Markdown again from the results

Writes ``results/update.json`` and ``.md``. Every detector at its default settings but
PatchCore's coreset (the detector search's: 1 % of at most 100,000 patches, so the cap and
the update's sample merge both come into play), input size 256 (short side), on
``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomatune import Pipeline, open_dataset
from anomatune.data.datasets import collate, seeded_split
from anomatune.metrics import MAIN_METRICS, image_auroc
from anomatune.models.settings import detector_settings
from anomatune.serve.drift import ks_statistic
from anomatune.validation.search import SEARCH_CORESET
from common import DATASETS, RESULTS, command_line, dataset, write_results

DEFAULT_DATASETS = ["transistor", "kolektorsdd1", "elpv_mono"]
MODELS = ["padim", "glad", "patchcore"]
NEW_SHARE = 0.3
DARKENING = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
# PatchCore's default coreset (10 % of up to 500,000 patches) takes up to 27 min a fit on one thread: the search's budget
DETECTOR_SETTINGS = {"patchcore": dict(SEARCH_CORESET)}


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, round(time.perf_counter() - start, 2)


def metrics_of(pipeline: Pipeline, test) -> dict:
    found = pipeline.score(test)
    return {k: None if found.get(k) is None else round(float(found[k]), 4) for k in MAIN_METRICS}


def update_vs_refit(name: str, models: list[str], seed: int, device: str) -> list[dict]:
    root, category = dataset(name)
    train = open_dataset(data=str(root), category=category, split="train")
    test = open_dataset(data=str(root), category=category, split="test")
    old_idx, new_idx = seeded_split(len(train), round(NEW_SHARE * len(train)), seed)
    old, new, union = train.subset(old_idx), train.subset(new_idx), train.subset(old_idx + new_idx)
    rows = []
    for model in models:

        def pipeline(model=model):
            detector = detector_settings(model, **DETECTOR_SETTINGS.get(model, {}))
            return Pipeline(detector=detector, threshold_folds=0, device=device, seed=seed)

        base, fit_seconds = timed(lambda: pipeline().fit(old))
        row = {"dataset": name, "model": model, "n_old": len(old), "n_new": len(new), "fit_70_seconds": fit_seconds}
        row["fit_70"] = metrics_of(base, test)
        refit, row["refit_seconds"] = timed(lambda: pipeline().fit(union))
        row["refit"] = metrics_of(refit, test)
        del refit
        _, row["update_seconds"] = timed(lambda base=base: base.update(new))
        row["update"] = metrics_of(base, test)
        row["time_ratio"] = round(row["update_seconds"] / row["refit_seconds"], 3)
        row["delta_image_auroc"] = round(row["update"]["image_auroc"] - row["refit"]["image_auroc"], 4)
        print(row, flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def drift_case(device: str) -> list[dict]:
    root, category = dataset("transistor")
    pipeline = Pipeline(detector="padim", device=device).fit(open_dataset(data=str(root), category=category, split="train"))
    calibration = pipeline.calibration_["scores"]
    test = open_dataset(data=str(root), category=category, split="test").at_size(pipeline.input_size)
    batches = list(DataLoader(test, batch_size=16, collate_fn=collate))
    labels = np.concatenate([b["label"].numpy() for b in batches])
    rows = []
    for factor in DARKENING:
        scores = np.concatenate([pipeline.forward((b["image"] * factor).clamp(0, 1))[1].numpy() for b in batches])
        good = scores[labels == 0]
        rows.append(
            {
                "factor": factor,
                "calibration_images": len(calibration),
                "ks_good": round(ks_statistic(good, calibration), 4),
                "good_over_threshold": round(float((good > pipeline.threshold).mean()), 4),
                "image_auroc": round(float(image_auroc(labels, scores)), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


def shown(value: float | None) -> str:
    """A metric, or n/a where it does not apply (no masks: null in the JSON, NaN in memory)."""
    return "n/a" if value is None or value != value else f"{value:.4f}"


def markdown(data: dict) -> str:
    rows, drift = data["rows"], data["drift"]
    lines = [
        "# anomatune update vs a refit",
        "",
        f"{int(NEW_SHARE * 100)} % of each category's good training images held back as new; fit on the rest, then "
        "refit on all or update with the new ones. Seconds on this machine, features included; metrics on the test split.",
        "",
        f"    {data['command']}    [{data['threads']} threads]",
        "",
        "| dataset | detector | old / new images | refit s | update s | update / refit | image AUROC 70 % | refit | update "
        "| Δ update − refit | pixel AUROC refit / update | AUPRO refit / update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['n_old']} / {r['n_new']} | {r['refit_seconds']:.1f} | {r['update_seconds']:.1f} "
            f"| {r['time_ratio']:.2f} | {r['fit_70']['image_auroc']:.4f} | {r['refit']['image_auroc']:.4f} "
            f"| {r['update']['image_auroc']:.4f} | {r['delta_image_auroc']:+.4f} "
            f"| {shown(r['refit']['pixel_auroc'])} / {shown(r['update']['pixel_auroc'])} "
            f"| {shown(r['refit']['aupro'])} / {shown(r['update']['aupro'])} |"
        )
    if drift:
        lines += [
            "",
            "## Drift: transistor's test images darkened step by step (PaDiM)",
            "",
            f"KS statistic of the good test images' scores against the {drift[0]['calibration_images']} calibration scores (what "
            "/metrics serves), their share over the threshold, and the image AUROC of the shifted test set.",
            "",
            "| brightness × | KS (good images) | good images over the threshold | image AUROC |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {d['factor']} | {d['ks_good']:.3f} | {d['good_over_threshold']:.3f} | {d['image_auroc']:.4f} |" for d in drift
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-drift", action="store_true", help="Skip the drift case.")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="update", help="Results file stem.")
    parser.add_argument("--table", metavar="JSON", help="Only write <name>.md from this results file.")
    args = parser.parse_args()
    if args.table:
        data = json.loads((RESULTS / args.table).read_text())
        return write_results(args.name, data, markdown(data))
    torch.set_num_threads(args.threads)
    rows = [row for name in args.datasets for row in update_vs_refit(name, args.models, args.seed, args.device)]
    drift = [] if args.no_drift else drift_case(args.device)
    command = command_line()
    data = {
        "command": command.strip(),
        "new_share": NEW_SHARE,
        "seed": args.seed,
        "threads": args.threads,
        "rows": rows,
        "drift": drift,
    }
    write_results(args.name, data, markdown(data))


if __name__ == "__main__":
    main()
