"""PatchCore against anomalib's, one difference at a time: where the features are pooled, and how.

anomalib 2.7's PatchCore (read from its sources, ``models/image/patchcore``): each stage's features are averaged
over 3 x 3 neighbours at the stage's own resolution (``AvgPool2d(3, 1, 1)``: zeros beyond the border count in the
average), then the coarser stage is upsampled (bilinear) to the finer one and the two are concatenated; the input is
resized to 256 x 256 and normalised with ImageNet's statistics; the map is the patch scores upsampled (nearest) and
smoothed (sigma 4). anomatune concatenates the stages first, then pools (3 x 3 on the finer grid, border cells
averaged over what exists). The variants here change the pooling alone, then the normalisation too, on our PatchCore
(coreset 0.01, as ``../shared/docs/ANCHORS.md``'s anomalib column), 256 x 256 inputs:

- ``ours``: concatenate, then pool;
- ``pool per stage``: pool each stage at its resolution, then upsample and concatenate (border cells averaged
  over what exists);
- ``pool per stage, zero border``: the same, zeros beyond the border counted (anomalib's ``AvgPool2d``);
- each of these with ``+ imagenet``: ImageNet's normalisation instead of the weights' own.

    python benchmarks/patchcore_parity.py                        # the five categories anomalib runs on

Writes ``results/patchcore_parity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from anomatune import Pipeline, open_dataset
from anomatune.features import extractor as extractor_module
from anomatune.pipeline.scoring import score_dataset
from common import SQUARE, dataset, markdown_page, run_record, write_results

ANOMALIB = {  # ../shared/docs/ANCHORS.md: anomalib 2.7 PatchCore (coreset 0.01), image AUROC / pixel AUROC / AUPRO
    "transistor": (0.997, 0.980, 0.950),
    "magnetic_tile": (0.958, 0.824, 0.725),
    "kolektorsdd1": (0.744, 0.855, 0.401),
    "bsdata_pitting": (0.952, 0.981, 0.816),
    "loco_juice_bottle_logical": (0.951, 0.893, 0.831),
}
POOLINGS = ("ours", "pool per stage", "pool per stage, zero border")


def pooled_per_stage(zero_border: bool):
    """``FeatureExtractor.stage_features`` with each stage pooled at its own resolution before the upsampling."""

    def stage_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.stage_maps(x)
        if self.pool > 1:
            maps = [F.avg_pool2d(m, self.pool, stride=1, padding=self.pool // 2, count_include_pad=zero_border) for m in maps]
        grid = (x.shape[-2] // extractor_module.GRID_STRIDE, x.shape[-1] // extractor_module.GRID_STRIDE)
        size = max([tuple(m.shape[-2:]) for m in maps] + [grid])
        maps = [
            m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps
        ]
        return torch.cat(maps, dim=1)

    return stage_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(ANOMALIB), choices=list(ANOMALIB))
    parser.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=POOLINGS)
    parser.add_argument("--normalizations", nargs="+", default=["backbone", "imagenet"])
    parser.add_argument("--coreset", type=float, default=0.01)
    parser.add_argument("--proj-dim", type=int, default=None, help="the coreset selection's projection (default: ours)")
    parser.add_argument("--out", default="patchcore_parity")
    args = parser.parse_args()
    original = extractor_module.FeatureExtractor.stage_features
    rows = []
    for name in args.datasets:
        root, category = dataset(name)
        for pooling in args.poolings:
            extractor_module.FeatureExtractor.stage_features = (
                original if pooling == "ours" else pooled_per_stage(zero_border=pooling.endswith("zero border"))
            )
            for normalization in args.normalizations:
                start = time.perf_counter()
                detector = {"name": "patchcore", "coreset_ratio": args.coreset}
                detector |= {"proj_dim": args.proj_dim} if args.proj_dim else {}
                pipeline = Pipeline(detector=detector, device="cpu",
                                    image_size=SQUARE, normalization=normalization, threshold_folds=0)  # fmt: skip
                pipeline.fit(open_dataset(data=root, category=category))
                metrics = score_dataset(pipeline, open_dataset(data=root, category=category, split="test")).metrics
                rows.append({"dataset": name, "pooling": pooling, "normalization": normalization,
                             **{k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
                             "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
                print(rows[-1], flush=True)
    extractor_module.FeatureExtractor.stage_features = original
    data = run_record(rows)
    page = markdown_page(
        "PatchCore against anomalib's, one difference at a time",
        data,
        f"coreset {args.coreset}{f', coreset projection {args.proj_dim}' if args.proj_dim else ''}, 256x256; "
        "anomalib: ../shared/docs/ANCHORS.md",
        ("category", "pooling", "normalisation", "image AUROC", "pixel AUROC", "AUPRO", "anomalib (image / pixel / AUPRO)", "s"),
        [
            (
                r["dataset"],
                r["pooling"],
                r["normalization"],
                f"{r['image_auroc']:.4f}",
                f"{r['pixel_auroc']:.4f}",
                f"{r['aupro']:.4f}",
                " / ".join(f"{v:.3f}" for v in ANOMALIB[r["dataset"]]),
                r["seconds"],
            )
            for r in rows
        ],  # fmt: skip
    )
    write_results(args.out, data, page)


if __name__ == "__main__":
    main()
