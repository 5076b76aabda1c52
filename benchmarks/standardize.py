"""Does standardising each map position by the good images' out-of-fold maps remove the border effect, and at what cost?

For each category and detector: the default fit (cross-fitted threshold at ``--rate``), then each
training image's out-of-fold patch map again (the fit's own folds), their mean and standard
deviation per position, and the test split scored three times: the maps as they are;
standardised per grid position, ``(map − mean) / std``, before the upsampling and smoothing; and
standardised per pixel after them (the smoothing's reflected border averages fewer independent
values, so its output varies more there). Per variant: image AUROC, pixel AUROC, AUPRO (image scores are the maps' maxima, PatchCore's own
score for PatchCore); the share of good test images whose map peaks in a border band; and the
good test images with a non-empty mask at a pixel threshold calibrated on the out-of-fold map
peaks at ``--rate``, with the share of their flagged pixels inside the band.

    python benchmarks/standardize.py                      # six categories, GLAD, PaDiM, PatchCore

Writes ``results/standardize.json`` and ``.md``. Input size 256x256, default settings; no test label
takes part in the standardisation or the thresholds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomatune import Pipeline, open_dataset
from anomatune.calibration import ScoreCalibration
from anomatune.data.datasets import collate
from anomatune.models.settings import DEFAULT_DETECTOR
from anomatune.pipeline.scoring import score_dataset
from border import band_mask
from common import DATASETS, SQUARE, dataset, markdown_page, run_record, write_results

VARIANTS = ("as is", "per grid position", "per pixel, smoothed")


def out_of_fold_maps(pipeline: Pipeline, train) -> torch.Tensor:
    """The training images' patch maps, each from the model fitted without its fold (the fit's folds)."""
    loader = DataLoader(train.at_size(pipeline.input_size), batch_size=pipeline.runtime.batch_size, collate_fn=collate)
    features = pipeline.extractor_.extract(loader, desc="train features again")
    folds = torch.tensor(pipeline.calibration_["folds"])
    maps, _ = pipeline.detector_.held_out_detect(features, folds)
    return maps.double()


def standardising_forward(pipeline: Pipeline, mean: torch.Tensor, std: torch.Tensor, after: bool):
    """The pipeline's forward with its maps standardised per grid position (before the post-processing) or per
    pixel (``after`` it: the image score is then the standardised map's maximum, PatchCore's own score stays)."""

    @torch.no_grad()
    def forward(images: torch.Tensor):
        maps, scores = pipeline.detector_.detect(pipeline.extractor_(images))
        if not after:
            maps = ((maps.double() - mean) / std).to(maps.dtype)
            maps, scores = pipeline.postprocessor_(maps, scores)
        else:
            maps, own = pipeline.postprocessor_(maps, scores)
            maps = ((maps.double() - mean) / std).float()
            scores = own if scores is not None else maps.flatten(1).amax(1)
        return maps.cpu(), scores.cpu()

    return forward


def smoothed(pipeline: Pipeline, patch_maps: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [pipeline.postprocessor_(patch_maps[i : i + 16].float(), None)[0].double() for i in range(0, len(patch_maps), 16)]
    )


def moments(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return maps.mean(0), maps.std(0).clamp_min(1e-6 * float(maps.std()) + 1e-12)


def variant_row(pipeline, test, peaks: list[float], rate: float, band: int) -> dict:
    """Metrics and border numbers of the pipeline as its ``forward`` now computes the maps; ``peaks``: the
    out-of-fold maps' maxima in the same variant (the pixel threshold's calibration)."""
    scored = score_dataset(pipeline, test)
    pixel_threshold = ScoreCalibration.fit(peaks, rate).threshold
    good = scored.maps[scored.labels == 0]
    border = band_mask(*good.shape[1:], band)
    flagged = good > pixel_threshold
    in_band = flagged[:, border].sum() / max(flagged.sum(), 1)
    return {
        **{k: scored.metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
        "peaks_in_band": float(border.reshape(-1)[good.reshape(len(good), -1).argmax(1)].mean()),
        "good_with_mask": float(flagged.reshape(len(good), -1).any(1).mean()),
        "flagged_pixels_in_band": float(in_band),
        "band_area": float(border.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--detectors", nargs="+", default=[DEFAULT_DETECTOR, "padim", "patchcore"])
    parser.add_argument("--band", type=int, default=16, help="border band width in pixels of the input size")
    parser.add_argument("--rate", type=float, default=0.05, help="the false-alarm rate of the pixel threshold")
    parser.add_argument("--out", default="standardize")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        root, category = dataset(name)
        train = open_dataset(data=root, category=category)
        test = open_dataset(data=root, category=category, split="test")
        for detector in args.detectors:
            pipeline = Pipeline(detector=detector, device="cpu", image_size=SQUARE, false_alarm_rate=args.rate)
            pipeline.fit(train)
            train_maps = out_of_fold_maps(pipeline, train)
            raw_forward = pipeline.forward
            for variant in VARIANTS:
                if variant == "as is":
                    pipeline.forward, peaks_of = raw_forward, smoothed(pipeline, train_maps)
                elif variant == "per grid position":
                    mean, std = moments(train_maps)
                    pipeline.forward = standardising_forward(pipeline, mean, std, after=False)
                    peaks_of = smoothed(pipeline, (train_maps - mean) / std)
                else:
                    mean, std = moments(smoothed(pipeline, train_maps))
                    pipeline.forward = standardising_forward(pipeline, mean, std, after=True)
                    peaks_of = (smoothed(pipeline, train_maps) - mean) / std
                peaks = peaks_of.flatten(1).amax(1).tolist()
                rows.append({"dataset": name, "detector": detector, "variant": variant,
                             **variant_row(pipeline, test, peaks, args.rate, args.band)})  # fmt: skip
                print(rows[-1], flush=True)
    data = run_record(rows)
    means = []
    for detector in args.detectors:
        for variant in VARIANTS:
            chosen = [r for r in rows if r["detector"] == detector and r["variant"] == variant]
            means.append({"dataset": f"mean of {len(chosen)}", "detector": detector, "variant": variant,
                          **{k: float(np.mean([r[k] for r in chosen])) for k in chosen[0] if isinstance(chosen[0][k], float)}})  # fmt: skip
    data["means"] = means
    page = markdown_page(
        "Out-of-fold standardisation of the maps: the border effect and the metrics",
        data,
        f"band {args.band} px of 256; pixel threshold at a {args.rate:.0%} false-alarm rate of the out-of-fold map peaks",
        (
            "category",
            "detector",
            "maps",
            "image AUROC",
            "pixel AUROC",
            "AUPRO",
            "good peaks in band",
            "good images with a mask",
            "their flagged pixels in band",
            "band area",
        ),  # fmt: skip
        [
            (
                r["dataset"],
                r["detector"],
                r["variant"],
                f"{r['image_auroc']:.4f}",
                f"{r['pixel_auroc']:.4f}",
                f"{r['aupro']:.4f}",
                f"{r['peaks_in_band']:.0%}",
                f"{r['good_with_mask']:.1%}",
                f"{r['flagged_pixels_in_band']:.0%}",
                f"{r['band_area']:.0%}",
            )  # fmt: skip
            for r in rows + means
        ],
    )
    write_results(args.out, data, page)


if __name__ == "__main__":
    main()
