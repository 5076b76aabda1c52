"""All detectors on the frozen default backbone, on ../shared/data transistor and magnetic_tile.

Image AUROC, pixel AUROC, AUPRO, fit seconds, test images/s and model size on disk.
Every image is resized to a 256 px square (anomalib's protocol), every training image is
in the fit (no threshold hold-out). Writes ``benchmarks/results/<name>.json`` and ``.md``.

    python benchmarks/detectors.py
    python benchmarks/detectors.py --datasets transistor --models padim glad
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from anomatune import Pipeline, open_dataset
from anomatune.folders.base import json_text
from anomatune.pipeline.scoring import score_dataset
from common import DATASETS, FIRST_TWO, RESULTS, SQUARE, command_line
from common import dataset as dataset_path

# PatchCore's coreset ratio on magnetic_tile follows anomalib's peer run (0.01): 0.1 takes hours there.
SETTINGS = {("patchcore", "magnetic_tile"): {"coreset_ratio": 0.01}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=FIRST_TWO, choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["gmm", "glad", "padim", "patchcore"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", default=SQUARE, help="Input size: a short side, or WxH.")
    parser.add_argument("--normalization", default="backbone", choices=["backbone", "imagenet"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Detector settings for every model.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="detectors", help="Results file stem.")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        root, category = dataset_path(name)
        for model in args.models:
            settings = SETTINGS.get((model, name), {}) | {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.set)}
            pipeline = Pipeline(
                detector={"name": model, **settings},
                backbone=args.backbone,
                image_size=args.image_size,
                normalization=args.normalization,
                threshold_folds=0,
                device=args.device,
            )  # MVTec protocol: every training image in the fit
            pipeline.fit(open_dataset(data=root, category=category))
            evaluation = score_dataset(pipeline, open_dataset(data=root, category=category, split="test"))
            with tempfile.TemporaryDirectory() as tmp:
                pipeline.save(Path(tmp) / "run")
                size = sum(p.stat().st_size for p in (Path(tmp) / "run").glob("*.safetensors"))
            row = {
                "dataset": name,
                "model": model,
                "settings": settings,
                **{k: round(evaluation.metrics[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")},
                "fit_seconds": pipeline.fit_seconds_,
                "test_images_per_s": round(len(evaluation.scores) / evaluation.seconds, 2),
                "model_mib": round(size / 2**20, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = command_line()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json_text({"command": command, "backbone": args.backbone, "rows": rows}, indent=2))
    lines = [
        f"# Detectors on the frozen {args.backbone} backbone ({args.normalization} normalisation)",
        "",
        f"Command: `{command}` (2-core CPU, torch default threads).",
        "",
        "| dataset | detector | image AUROC | pixel AUROC | AUPRO | fit s | test images/s | model MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["model"] + (f" ({', '.join(f'{k}={v}' for k, v in r['settings'].items())})" if r["settings"] else "")
        lines.append(
            f"| {r['dataset']} | {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_seconds']:.1f} | {r['test_images_per_s']:.1f} | {r['model_mib']} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
