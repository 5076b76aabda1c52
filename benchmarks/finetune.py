"""Frozen vs fine-tuned backbone, per detector, on ../shared/data transistor and magnetic_tile.

For each seed: ``finetune`` (the defaults of ``FinetuneSettings`` unless ``--set``) with
``../shared/data/natural/imagenet_samples`` as negatives, then every detector is refit
from scratch on the frozen and on the fine-tuned backbone with the same settings and
seed, and evaluated (image AUROC, pixel AUROC, AUPRO). Reports mean ± std over seeds,
fine-tuning wall time, the share of negative patches with gradient weight > 0.01 at the
start and end, and the change of the good features' variance (the collapse guard).
Writes ``benchmarks/results/<name>.json`` / ``.md`` (rows are saved as they come) and
the first seed's Figure 2 per dataset.

    python benchmarks/finetune.py
    python benchmarks/finetune.py --datasets transistor --models glad --seeds 0 --set temperature=16 --name trial
    python benchmarks/finetune.py --combine finetune_transistor.json finetune_magnetic_tile.json --name finetune
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from anomatune import Pipeline, RunFolder, open_dataset
from anomatune.apps.options import parse_pairs
from anomatune.evaluation.evaluate import score_dataset
from anomatune.finetune import FinetuneSettings, finetune
from common import DATASETS, FIRST_TWO, NEGATIVES, RESULTS, SQUARE, dataset as dataset_path

# PatchCore at coreset 0.01 on both datasets (0.1 takes 4+ minutes a fit on this CPU); same for frozen and fine-tuned.
DETECTOR_SETTINGS = {"patchcore": {"coreset_ratio": 0.01}}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _mean_std(values) -> str:
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _table(rows: list[dict], commands: list[str], settings: dict) -> str:
    lines = ["# Frozen vs fine-tuned backbone", "", "Commands (2-core CPU):", "", *[f"    {c}" for c in commands], "",
             f"Fine-tuning settings: `{json.dumps(settings)}`", "",
             "| dataset | detector | backbone | seeds | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["model"], r["backbone"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "frozen"))
    for dataset, model, backbone in keys:
        group = [r for r in rows if (r["dataset"], r["model"], r["backbone"]) == (dataset, model, backbone)]
        lines.append(f"| {dataset} | {model} | {backbone} | {len(group)} | " + " | ".join(_mean_std(r[m] for r in group) for m in METRICS) + " |")
    paired = sorted({(r["dataset"], r["model"]) for r in rows})
    lines += ["", "Fine-tuned minus frozen, paired by seed (mean ± std over seeds):", "",
              "| dataset | detector | seeds | Δ image AUROC | Δ pixel AUROC | Δ AUPRO |", "|---|---|---|---|---|---|"]
    for dataset, model in paired:
        by_seed = {(r["seed"], r["backbone"]): r for r in rows if (r["dataset"], r["model"]) == (dataset, model)}
        seeds = sorted(seed for seed, backbone in by_seed if backbone == "fine-tuned" and (seed, "frozen") in by_seed)
        if seeds:
            deltas = [" | ".join(_mean_std(by_seed[(k, "fine-tuned")][m] - by_seed[(k, "frozen")][m] for k in seeds) for m in METRICS)]
            lines.append(f"| {dataset} | {model} | {len(seeds)} | {deltas[0]} |")
    tunes = [r for r in rows if r.get("finetune_seconds") is not None]
    if tunes:
        lines += ["", "| dataset | seed | fine-tuning s | negatives weight > 0.01, start → end | kept by the filter > 0.01, start → end | good-feature variance ratio | collapsed |",
                  "|---|---|---|---|---|---|---|"]
        for r in tunes:
            lines.append(f"| {r['dataset']} | {r['seed']} | {r['finetune_seconds']:.0f} | {r['visible_start']:.3f} → {r['visible_end']:.3f} | "
                         f"{r['kept_visible_start']:.3f} → {r['kept_visible_end']:.3f} | {r['variance_ratio']:.2f} | {r['collapsed']} |")
    return "\n".join(lines) + "\n"


def combine(files: list[str], name: str) -> None:
    """One table from the JSON results of several runs (e.g. one process per dataset)."""
    parts = [json.loads((RESULTS / f).read_text() if not Path(f).exists() else Path(f).read_text()) for f in files]
    rows = [row for part in parts for row in part["rows"]]
    commands = [part["command"] for part in parts]
    (RESULTS / f"{name}.json").write_text(json.dumps({"commands": commands, "settings": parts[0]["settings"], "rows": rows}, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(_table(rows, commands, parts[0]["settings"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=FIRST_TWO, choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["gmm", "glad", "padim", "patchcore"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="changes", nargs="*", default=[], metavar="KEY=VALUE", help="Fine-tuning settings to change.")
    parser.add_argument("--no-frozen", action="store_true", help="Skip the frozen-backbone rows.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="finetune", help="Results file stem.")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="Only merge these results files into <name>.json/.md.")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.name)
    logging.basicConfig(level=logging.WARNING)
    changes = parse_pairs(args.changes)  # flat names of FinetuneSettings, e.g. temperature=16 or proj_dim=64
    base = FinetuneSettings().updated(image_size=SQUARE, **changes)  # the 256 px square protocol of the committed tables
    device = args.device
    command = ("python benchmarks/finetune.py " + " ".join(sys.argv[1:])).strip()
    rows: list[dict] = []
    RESULTS.mkdir(exist_ok=True)

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command, "settings": base.to_dict(), "rows": rows}, indent=1) + "\n")
        (RESULTS / f"{args.name}.md").write_text(_table(rows, [command], changes or {"defaults": True}))

    for dataset in args.datasets:
        root, category = dataset_path(dataset)
        train, test = (open_dataset(data=root, category=category, split=split) for split in ("train", "test"))
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                tuned = Path(tmp) / "finetune"
                settings = base.updated(seed=seed)
                report = finetune(train, NEGATIVES, tuned, settings, device=device)
                folder = RunFolder(tuned)
                seconds = folder.read_yaml(RunFolder.FINETUNE)["seconds_this_session"]
                if seed == args.seeds[0]:
                    shutil.copy(folder / RunFolder.WEIGHTS_FIGURE, RESULTS / f"{args.name}_weights_{dataset}.png")
                    shutil.copy(folder / RunFolder.LOSS_FIGURE, RESULTS / f"{args.name}_loss_{dataset}.png")
                tune_stats = {"finetune_seconds": seconds, "visible_start": report["start"]["negative_visible_share"],
                              "visible_end": report["end"]["negative_visible_share"],
                              "kept_visible_start": report["start"]["kept_visible_share"], "kept_visible_end": report["end"]["kept_visible_share"],
                              "variance_ratio": report["feature_variance_ratio"], "collapsed": report["collapsed"]}
                for i, model in enumerate(args.models):
                    for backbone, weights in ([] if args.no_frozen else [("frozen", None)]) + [("fine-tuned", str(tuned))]:
                        pipeline = Pipeline(detector={"name": model, **DETECTOR_SETTINGS.get(model, {})}, backbone=settings.features.backbone,
                                            backbone_weights=weights, seed=seed, image_size=settings.features.image_size,
                                            threshold_holdout=0, device=device)  # MVTec protocol: every training image in the fit
                        metrics = score_dataset(pipeline.fit(train), test).metrics
                        extra = tune_stats if (backbone == "fine-tuned" and i == 0) else {}
                        record({"dataset": dataset, "model": model, "backbone": backbone, "seed": seed,
                                **{m: round(metrics[m], 4) for m in METRICS}, **extra})


if __name__ == "__main__":
    main()
