"""All detectors on the frozen default backbone, on ../shared/data transistor and magnetic_tile.

Image AUROC, pixel AUROC, AUPRO, fit seconds, test images/s and model size on disk.
Writes ``benchmarks/results/detectors.json`` and ``detectors.md``.

    python benchmarks/detectors.py
    python benchmarks/detectors.py --datasets transistor --models padim glad
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from anomatune.runs import evaluate, fit
from common import DATASETS, RESULTS, dataset as dataset_path

# PatchCore's coreset ratio on magnetic_tile follows anomalib's peer run (0.01): 0.1 takes hours there.
SETTINGS = {("patchcore", "magnetic_tile"): {"coreset_ratio": 0.01}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["gmm", "glad", "padim", "patchcore"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--name", default="detectors", help="Results file stem.")
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        root, category = dataset_path(dataset)
        for model in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                settings = SETTINGS.get((model, dataset), {})
                fit(root, category, tmp, model=model, backbone=args.backbone, detector_settings=settings, threshold_holdout=0)  # MVTec protocol: all train images
                result = evaluate(tmp, figures=False)
                size = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
            row = {"dataset": dataset, "model": model, "settings": settings, **{k: result[k] for k in
                   ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "test_images_per_s")}, "model_mib": round(size / 2**20, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    command = "python benchmarks/detectors.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"command": command.strip(), "backbone": args.backbone, "rows": rows}, indent=2) + "\n")
    lines = [f"# Detectors on the frozen {args.backbone} backbone", "", f"Command: `{command.strip()}` (2-core CPU, torch default threads).", "",
             "| dataset | detector | image AUROC | pixel AUROC | AUPRO | fit s | test images/s | model MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["model"] + (f" ({', '.join(f'{k}={v}' for k, v in r['settings'].items())})" if r["settings"] else "")
        lines.append(f"| {r['dataset']} | {name} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_seconds']:.1f} | {r['test_images_per_s']:.1f} | {r['model_mib']} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
