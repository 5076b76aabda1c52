"""Why anomatune's PatchCore scores below anomalib's on transistor: the preprocessing.

anomalib's PatchCore crops the centre 224 px of each 256-px image and normalises with
ImageNet statistics; anomatune uses the whole image and the weights' own normalisation
(mean = std = 0.5 for EfficientNet-Lite). This runs PatchCore (coreset 0.1, frozen Lite0)
on transistor with each variant. Writes ``benchmarks/results/patchcore_preprocessing.{json,md}``.

    python benchmarks/patchcore_preprocessing.py --variants full crop crop+imagenet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from anomatune.data import MVTecAD, collate
from anomatune.features import FeatureExtractor
from anomatune.features.backbones import IMAGENET_MEAN, IMAGENET_STD
from anomatune.metrics import pixel_curves, split_metrics
from anomatune.models import PatchCore
from common import command_line, score_features

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
RESULTS = Path(__file__).parent / "results"


class CentreCrop:
    """A dataset view whose images and masks keep their central ``size`` pixels."""

    def __init__(self, dataset, size: int = 224):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        top = (item["image"].shape[-1] - self.size) // 2
        window = (slice(None), slice(top, top + self.size), slice(top, top + self.size))
        item["image"] = item["image"][window]
        item["mask"] = item["mask"][window]
        return item


def run(variant: str) -> dict:
    extractor = FeatureExtractor("efficientnet_lite0").eval()
    if "imagenet" in variant:
        extractor.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        extractor.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    view = CentreCrop if "crop" in variant else (lambda dataset: dataset)
    train = extractor.extract(DataLoader(view(MVTecAD(ROOT, "transistor", "train")), batch_size=8, collate_fn=collate))
    test = list(DataLoader(view(MVTecAD(ROOT, "transistor", "test")), batch_size=8, collate_fn=collate))
    masks = torch.cat([b["mask"] for b in test]).numpy().astype(bool)[:, 0]
    detector = PatchCore().fit(train)
    maps, scores = score_features(detector, extractor.extract(test), masks.shape[-2:])
    metrics = split_metrics(torch.cat([b["label"] for b in test]).numpy(), scores, pixel_curves(masks, maps))
    return {"variant": variant, **{k: round(v, 4) for k, v in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants", nargs="+", default=["full", "crop", "crop+imagenet"], choices=["full", "crop", "imagenet", "crop+imagenet"]
    )
    args = parser.parse_args()
    if not ROOT.exists():
        sys.exit(f"{ROOT} is absent: this benchmark needs ../shared/data")
    rows = []
    for variant in args.variants:
        rows.append(run(variant))
        print(json.dumps(rows[-1]), flush=True)
    command = command_line()
    (RESULTS / "patchcore_preprocessing.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# PatchCore on transistor: whole image vs anomalib's preprocessing",
        "",
        f"Command: `{command}` (2-core CPU).",
        "",
        "Pixel metrics of cropped variants cover the central 224 px only.",
        "",
        "| variant | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} |" for r in rows]
    (RESULTS / "patchcore_preprocessing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
