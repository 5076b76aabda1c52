"""Frozen vs fine-tuned backbone on the six development categories, and the levers of the fine-tuning.

Plan, category by category (each unit is skipped once ``--budget`` seconds have passed,
so a run on a lent GPU returns whatever it finished; rows are written as they come):

1. the category's frozen baseline, for every detector of ``--models``;
2. every configuration of ``--configs`` (named changes of ``FinetuneSettings``, see
   ``CONFIGS``) at every seed of ``--seeds``: ``anomatune finetune`` with validation
   negatives from a second photo source (``natural/imagen``; the training negatives are
   ``natural/imagenet_samples``), then every detector refit from scratch on the kept
   backbone ("fine-tuned") and, when the kept step is not the last, on the last step's
   ("last");
3. with ``--then-best-seeds``, after every category: the configuration with the highest
   mean *validation* gain over the categories (no test label is read to choose it), at
   those seeds.

Each fine-tuned row carries the validation gain of its checkpoint over the frozen
features: the agreement of validation and test gains is computed from these rows.
Detectors are fitted on every training image (``threshold_folds=0``: no threshold, the MVTec
protocol), at the default input size (short side 256, aspect ratio kept), each on the features
``fit --detector NAME`` gives it (PatchCore: each stage averaged at its own resolution), with their
default settings except PatchCore's coreset (``DETECTOR_SETTINGS``). Writes
``benchmarks/results/<name>.json``; ``--table`` turns result files into ``<name>.md``.

    python benchmarks/finetune.py --configs default --seeds 0 1 2 --explore pasted near+pasted --name finetune
    python benchmarks/finetune.py --configs adaptor adaptor_cutpaste --seeds 0 --then-best-seeds 1 2 --budget 540
    python benchmarks/finetune.py --table finetune_gpu.json finetune_cpu.json --name finetune
    python benchmarks/finetune.py --configs default --set backbone=dinov2_vits14 --name finetune_dinov2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomatune import open_dataset
from anomatune.data.datasets import collate
from anomatune.device import resolve_device
from anomatune.features.extractor import FeatureExtractor
from anomatune.features.settings import AUTO, FeatureSettings
from anomatune.finetune import FinetuneSettings, finetune
from anomatune.finetune.loop import Finetuner
from anomatune.folders.kinds import FinetuneFolder, RunFolder
from anomatune.metrics import image_auroc, pixel_curves, split_metrics
from anomatune.models.registry import create_detector
from anomatune.models.settings import detector_settings
from anomatune.validation.search import SEARCH_CORESET, SEARCH_EM, FeatureView, StageMaps
from anomatune.validation.settings import ValidationSettings
from common import DATASETS, NEGATIVES, RESULTS, SHARED, command_line, score_features
from common import dataset as dataset_path

VALIDATION_NEGATIVES = SHARED / "natural" / "imagen"
# the detectors as the detector search fits them (validation.search): the defaults take up to 7 (GLAD) and 27 min
# (PatchCore, coreset 0.01) a fit on one CPU thread; frozen and fine-tuned rows use the same, so the differences pair
DETECTOR_SETTINGS = {"glad": dict(SEARCH_EM), "gmm": dict(SEARCH_EM), "patchcore": dict(SEARCH_CORESET)}
METRICS = ("image_auroc", "pixel_auroc", "aupro")
ADAPTOR = {"mode": "adaptor"}  # lr 1e-3 (the default for the adaptor)
BACKBONE = {"mode": "backbone"}  # lr 3e-5 (the default for the backbone)
CONFIGS = {  # name: changes of FinetuneSettings (the defaults of the code that runs, plus these)
    "default": {},
    "backbone": BACKBONE,
    "backbone_deepest_stage": BACKBONE | {"frozen_blocks": 3},
    "backbone_trust": BACKBONE | {"trust": 1.0},
    "backbone_lr1e-4": BACKBONE | {"lr": 1e-4},
    "backbone_1000_steps": BACKBONE | {"steps": 1000, "checkpoint_every": 100},
    "adaptor": ADAPTOR,
    "adaptor_cutpaste": ADAPTOR | {"negative_mode": "cutpaste"},
    "adaptor_pasted+cutpaste": ADAPTOR | {"negative_mode": "pasted+cutpaste"},
    "adaptor_pasted+noise": ADAPTOR | {"negative_mode": "pasted+noise"},
    "adaptor_pasted+cutpaste+noise": ADAPTOR | {"negative_mode": "pasted+cutpaste+noise"},
    "adaptor_glad_full_guide": ADAPTOR | {"guide": {"name": "glad", "n_components": 16, "normalize": False}, "proj_dim": None},
    "adaptor_fixed_guide": ADAPTOR | {"decay": 0.0},
    "adaptor_trust": ADAPTOR | {"trust": 1.0},
    "adaptor_lr1e-2": ADAPTOR | {"lr": 1e-2},
    "adaptor_1000_steps": ADAPTOR | {"steps": 1000, "checkpoint_every": 200},
    "adaptor_width8": ADAPTOR | {"adaptor_width": 8},
    # near negatives, the loss where the anomaly is, a curriculum, a guide per detector
    "pasted": ADAPTOR | {"negative_mode": "pasted", "context_positives": False},
    "near": ADAPTOR | {"negative_mode": "synthetic"},
    "near+pasted": ADAPTOR | {"negative_mode": "synthetic+pasted"},
    "near+noise": ADAPTOR | {"negative_mode": "synthetic+noise"},
    "near_no_context": ADAPTOR | {"negative_mode": "synthetic", "context_positives": False},
    "near_no_curriculum": ADAPTOR | {"negative_mode": "synthetic", "curriculum": 0.0},
    "near_padim_guide": ADAPTOR | {"negative_mode": "synthetic", "guide": "padim", "validator": "padim"},
    "near_knn_guide": ADAPTOR
    | {"negative_mode": "synthetic", "guide": {"name": "patchcore", "coreset_ratio": 0.01}, "validator": "patchcore"},
    "near_split": ADAPTOR  # train and validate on different families (validation_families goes to the validation)
    | {"negative_families": "cutpaste,texture,color", "validation_families": "scar,blend,deform"},
    "backbone_near": BACKBONE | {"negative_mode": "synthetic"},
    "backbone_near_trust_late": BACKBONE | {"negative_mode": "synthetic", "trust": 1.0, "frozen_blocks": 3},
}


class Category:
    """A category's test images and masks and its training set, loaded once; features per weights file."""

    def __init__(self, name: str, device: torch.device, workers: int, features: FeatureSettings, models: list[str]):
        root, category = dataset_path(name)
        self.name, self.device, self.feature_settings = name, device, features
        # each detector's aggregation as `fit --detector NAME` resolves it (PatchCore: each stage averaged on its own)
        self.aggregation = {
            m: detector_settings(m).auto_aggregation if features.aggregation == AUTO else features.aggregation for m in models
        }
        self.train = open_dataset(data=root, category=category, split="train")
        self.size = self.train.size_for(features.image_size)
        test = open_dataset(data=root, category=category, split="test").at_size(self.size)
        loader = lambda data: DataLoader(data, batch_size=32, collate_fn=collate, num_workers=workers)  # noqa: E731
        self.train_images = torch.cat([b["image"] for b in loader(self.train.at_size(self.size))])
        batches = list(loader(test))
        self.test_images = torch.cat([b["image"] for b in batches])
        self.labels = torch.cat([b["label"] for b in batches]).numpy()
        self.masks = None if batches[0]["mask"] is None else torch.cat([b["mask"] for b in batches]).numpy().astype(bool)[:, 0]

    def extract(self, extractor: FeatureExtractor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train and test features of ``extractor`` in each aggregation the detectors use, from one backbone pass
        (the search's :class:`StageMaps`)."""
        maps = [
            StageMaps(extractor, torch.split(images, 32), f"{split} features")
            for split, images in (("train", self.train_images), ("test", self.test_images))
        ]
        views = {a: FeatureView(extractor.layers, a) for a in set(self.aggregation.values())}
        return {a: tuple(split.features(view) for split in maps) for a, view in views.items()}

    def features(self, weights: str | None = None, adaptor_only: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Train and test features with ``weights``, per aggregation; ``adaptor_only``: the weights are the frozen
        backbone plus an adaptor, which is then applied to the frozen features computed once (the same arithmetic,
        minutes sooner)."""
        extractor = FeatureExtractor(self.feature_settings.updated(backbone_weights=weights)).to(self.device).eval()
        if adaptor_only:
            with torch.no_grad():
                return {
                    aggregation: tuple(
                        torch.cat([extractor.adapt(chunk.to(self.device)).cpu() for chunk in torch.split(frozen, 32)])
                        for frozen in pair
                    )
                    for aggregation, pair in self.frozen.items()
                }
        features = self.extract(extractor)
        if weights is None:
            self.frozen = features
        return features

    def metrics(self, model: str, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """The detector fitted on the training features in its aggregation, scored on the test split."""
        train_features, test_features = features[self.aggregation[model]]
        settings = detector_settings(model, **DETECTOR_SETTINGS.get(model, {}))
        detector = create_detector(settings).fit(train_features.to(self.device))
        maps, scores = score_features(detector, test_features.to(self.device), self.size)
        result = split_metrics(self.labels, scores, pixel_curves(self.masks, maps))
        metrics = {m: None if np.isnan(result[m]) else round(result[m], 4) for m in METRICS}
        return metrics | {"image_scores": [float(f"{v:.6g}") for v in scores]}  # for the bootstrap over test images


@contextmanager
def oracle_curve(cat: Category, models: list[str], curve: list[dict]):
    """While a fine-tuning runs, each validated checkpoint's test metrics too: every detector refitted on the
    checkpoint's features of all training images and scored on the test split. Reads test labels: a diagnostic of
    whether training can help at all, never an input of a choice."""
    original = Finetuner.validate

    def validate(self) -> None:
        original(self)
        if self.valset is None or not self.state.validation:
            return
        was_training = self.extractor.training
        self.extractor.eval()
        features = cat.extract(self.extractor)
        self.extractor.train(was_training)
        last = self.state.validation[-1]
        # every signal the validation computed, for the table of which one tracks the test best
        signals = {"aggregate": last["score"], "AUPRO": last["aupro"]} | {f"family {f}": v for f, v in last["families"].items()}
        point = {"step": self.state.step, "validation": last["score"], "signals": signals}
        for model in models:
            metrics = cat.metrics(model, features)
            point[model] = {m: metrics[m] for m in ("image_auroc", "aupro")}
        print(json.dumps({"oracle": cat.name, **point}), flush=True)
        curve.append(point)

    Finetuner.validate = validate
    try:
        yield curve
    finally:
        Finetuner.validate = original


def oracle_table(rows: list[dict]) -> list[str]:
    """Per run's category and detector: the test gain at the kept checkpoint, at the best checkpoint on test (an upper
    bound that reads test labels) and the rank correlation of validation and test along the run."""
    runs = [r for r in rows if r.get("curve") and r["backbone"] == "fine-tuned"]
    if not runs:
        return []
    lines = [
        "## The oracle curve: could the training help at all, or only the judge not pick it?",
        "",
        "For every validated checkpoint of a run, the detectors refitted on its features and scored on the test split. "
        "*best on test* reads test labels: an upper bound, never used for a default. Gains are over step 0 (the frozen "
        "features); ρ: Spearman's rank correlation of the validation score and the test image AUROC along the run "
        "(mean over runs).",
        "",
        "| configuration | dataset | detector | runs | gain at kept | gain at best on test | best step | ρ validation–test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["config"], r["dataset"], r["model"]), []).append(r)
    for (config, dataset, model), group in groups.items():
        kept, best, steps, rhos = [], [], [], []
        for r in group:
            curve = [p for p in r["curve"] if p[model]["image_auroc"] is not None]
            base = next(p for p in curve if p["step"] == 0)[model]["image_auroc"]
            at = {p["step"]: p[model]["image_auroc"] for p in curve}
            kept.append(at.get(r["kept_step"], base) - base)
            top = max(curve, key=lambda p: p[model]["image_auroc"])
            best.append(top[model]["image_auroc"] - base)
            steps.append(top["step"])
            rhos.append(_spearman([p["validation"] for p in curve], [p[model]["image_auroc"] for p in curve]))
        lines.append(
            f"| {config} | {dataset} | {model} | {len(group)} | {_mean_std(kept)} | {_mean_std(best)} | "
            f"{', '.join(map(str, steps))} | {np.nanmean(rhos):.2f} |"
        )
    return lines + [""]


def signal_table(rows: list[dict]) -> list[str]:
    """Which validation signal tracks the test along a run: per detector, Spearman's ρ between each signal recorded
    at the checkpoints and the test image AUROC, mean over runs (a diagnostic that reads test labels)."""
    runs = [r for r in rows if r.get("curve") and r["backbone"] == "fine-tuned" and "signals" in r["curve"][0]]
    rhos: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        curve = [p for p in r["curve"] if p[r["model"]]["image_auroc"] is not None]
        test = [p[r["model"]]["image_auroc"] for p in curve]
        for name in curve[0]["signals"]:
            values = [p["signals"].get(name) for p in curve]
            if None not in values:
                rhos.setdefault(name, {}).setdefault(r["model"], []).append(_spearman(values, test))
    if not rhos:
        return []
    models = sorted({r["model"] for r in runs})
    lines = [
        "## Which validation signal tracks the test along the run?",
        "",
        "Spearman's ρ between each signal of the validation (the aggregate it keeps a checkpoint by, its AUPRO, each "
        "anomaly family's image AUROC) and the test image AUROC of the detector refitted at the same checkpoints; "
        "mean over runs (runs in brackets). Reads test labels: a diagnostic for the judge, never a choice.",
        "",
        "| signal | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for name, per_model in rhos.items():
        cells = [f"{np.nanmean(v):+.2f} ({len(v)})" if (v := per_model.get(m)) else "–" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:+.4f}"


def _category_mean(rows: list[dict], key: str) -> str:
    """Per seed, the mean of ``key`` over the categories; then mean ± std over the seeds."""
    seeds = sorted({r["seed"] for r in rows})
    per_seed = [[r[key] for r in rows if r["seed"] == seed and r[key] is not None] for seed in seeds]
    return _mean_std(statistics.mean(values) for values in per_seed if values)


def _deltas(rows: list[dict], frozen: dict, backbone: str = "fine-tuned") -> list[dict]:
    """Each fine-tuned row with its test gains over the frozen row of the same category and detector."""
    out = []
    for r in rows:
        base = frozen.get((r["dataset"], r["model"]))
        if r["backbone"] == backbone and base:
            out.append(r | {f"d_{m}": None if r[m] is None or base[m] is None else r[m] - base[m] for m in METRICS})
    return out


def _spearman(x, y) -> float:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)  # noqa: E731
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(rank(np.asarray(x)), rank(np.asarray(y)))[0, 1])


BOOTSTRAP = 2000  # resamples of the paired bootstrap


def bootstrap_deltas(labels: np.ndarray, frozen: np.ndarray, tuned: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``BOOTSTRAP`` resamples of the mean over seeds of fine-tuned minus frozen image AUROC: the test images
    (good and defective ones resampled apart) and the seeds drawn with replacement, paired."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    out = np.empty(BOOTSTRAP)
    for b in range(BOOTSTRAP):
        idx = np.concatenate([rng.choice(good, len(good)), rng.choice(bad, len(bad))])
        seeds = rng.integers(len(tuned), size=len(tuned))
        base = image_auroc(labels[idx], frozen[idx])
        out[b] = np.mean([image_auroc(labels[idx], tuned[k][idx]) - base for k in seeds])
    return out


def _interval(values: np.ndarray) -> str:
    low, high = np.percentile(values, [2.5, 97.5])
    return f"[{low:+.4f}, {high:+.4f}]"


def bootstrap_table(parts: list[dict], config: str) -> list[str]:
    """Per detector and category, the paired difference (mean over seeds) with its bootstrap 95 % interval, and the
    six-category mean with its interval (each category resampled on its own)."""
    labels = {name: np.asarray(v) for p in parts for name, v in p.get("labels", {}).items()}
    rows = [r for p in parts for r in p["rows"] if "image_scores" in r]
    frozen = {(r["dataset"], r["model"]): np.asarray(r["image_scores"]) for r in rows if r["backbone"] == "frozen"}
    tuned: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["backbone"] == "fine-tuned" and r["config"] == config:
            tuned.setdefault((r["dataset"], r["model"]), []).append(r)
    datasets = [d for d in DATASETS if any(key[0] == d for key in tuned)]
    models = sorted({key[1] for key in tuned})
    if not tuned:
        return []
    rng = np.random.default_rng(0)
    lines = [
        f"## `{config}`: fine-tuned minus frozen image AUROC, with its bootstrap 95 % interval",
        "",
        f"Paired: the same test images score both backbones; {BOOTSTRAP} resamples of the test images (good and "
        "defective apart) and of the seeds. The mean over categories resamples each category on its own. AUPRO: the "
        "mean over categories of fine-tuned minus frozen (no interval). Fallbacks: runs that kept the frozen backbone.",
        "",
        "| detector | " + " | ".join(datasets) + " | mean | mean Δ AUPRO | fallbacks |",
        "|---|" + "---|" * (len(datasets) + 3),
    ]
    for model in models:
        cells, draws, aupro, fallbacks, runs = [], [], [], 0, 0
        for d in datasets:
            group = tuned.get((d, model), [])
            if not group or (d, model) not in frozen:
                cells.append("–")
                continue
            scores = [np.asarray(r["image_scores"]) for r in group]
            base = frozen[(d, model)]
            delta = np.mean([image_auroc(labels[d], t) - image_auroc(labels[d], base) for t in scores])
            resampled = bootstrap_deltas(labels[d], base, scores, rng)
            draws.append(resampled)
            cells.append(f"{delta:+.4f} {_interval(resampled)}")
            base_row = next(r for r in rows if (r["dataset"], r["model"], r["backbone"]) == (d, model, "frozen"))
            if base_row["aupro"] is not None:
                aupro.append(np.mean([r["aupro"] - base_row["aupro"] for r in group]))
            fallbacks, runs = fallbacks + sum(r["fallback"] for r in group), runs + len(group)
        mean = np.mean([float(c.split()[0]) for c in cells if c != "–"])
        interval = _interval(np.mean(draws, axis=0)) if draws else ""
        aupro_cell = f"{np.mean(aupro):+.4f}" if aupro else "–"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | **{mean:+.4f}** {interval} | {aupro_cell} | {fallbacks}/{runs} |")
    return lines + [""]


def write_table(files: list[Path], out: Path) -> None:
    """The Markdown tables of one or more results files."""
    parts = [json.loads(f.read_text()) for f in files]
    rows = [r for part in parts for r in part["rows"]]
    frozen = {(r["dataset"], r["model"]): r for r in rows if r["backbone"] == "frozen"}
    kept, last = _deltas(rows, frozen), _deltas(rows, frozen, "last")
    models = sorted({r["model"] for r in rows})
    lines = [
        "# Frozen vs fine-tuned backbone on the six development categories",
        "",
        f"Rows: {', '.join(f'`{f.name}`' for f in files)}; written by `python benchmarks/finetune.py --table "
        f"{' '.join(f.name for f in files)} --name {out.stem}`. Commands (device in brackets):",
        "",
        *[
            f"    {c}    [{p['device'] if isinstance(p['device'], str) else '; '.join(p['device'])}]"
            for p in parts
            for c in p.get("commands", [p.get("command")])
        ],
        "",
    ]
    for config in dict.fromkeys(r["config"] for r in rows if r["backbone"] == "fine-tuned"):  # in the order run
        lines += bootstrap_table(parts, config)
    lines += oracle_table(rows)
    lines += signal_table(rows)
    lines += [
        "## Every configuration: mean over categories of fine-tuned minus frozen (the kept checkpoint)",
        "",
        "Each Δ: the mean over the categories of fine-tuned minus frozen, per seed, then mean ± std over the seeds (one "
        "seed: the number alone); the categories are listed per configuration below. Validation gain: the validation "
        "score (the mean image AUROC over the anomaly families of the validation set) of the kept "
        "checkpoint minus the frozen features', mean ± std over runs. Fallbacks: runs that kept the frozen backbone.",
        "",
        "| configuration | runs | fallbacks | validation gain | "
        + " | ".join(f"{m} Δ image AUROC | {m} Δ AUPRO" for m in models)
        + " | fine-tuning s |",
        "|---|---|---|---|" + "---|---|" * len(models) + "---|",
    ]
    for config in dict.fromkeys(r["config"] for r in kept):
        group = [r for r in kept if r["config"] == config]
        runs = {(r["dataset"], r["seed"]): r for r in group}
        cells = []
        for m in models:
            by_model = [r for r in group if r["model"] == m]
            cells += [_category_mean(by_model, "d_image_auroc"), _category_mean(by_model, "d_aupro")]
        lines.append(
            f"| {config} | {len(runs)} | {sum(r['fallback'] for r in runs.values())} | "
            f"{_mean_std(r['validation_gain'] for r in runs.values())} | "
            + " | ".join(cells)
            + f" | {statistics.mean(r['finetune_seconds'] for r in runs.values()):.0f} |"
        )
    lines += [
        "",
        "## Per category (mean ± std over seeds of fine-tuned minus frozen)",
        "",
        "| configuration | dataset | detector | seeds | frozen image AUROC / pixel AUROC / AUPRO | Δ image AUROC | Δ pixel AUROC | Δ AUPRO | kept steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config in dict.fromkeys(r["config"] for r in kept):
        for (dataset, model), base in frozen.items():
            group = [r for r in kept if (r["config"], r["dataset"], r["model"]) == (config, dataset, model)]
            if group:
                shown = " / ".join("–" if base[m] is None else f"{base[m]:.4f}" for m in METRICS)
                lines.append(
                    f"| {config} | {dataset} | {model} | {len(group)} | {shown} | "
                    + " | ".join(_mean_std(r[f"d_{m}"] for r in group) for m in METRICS)
                    + f" | {', '.join(str(r['kept_step']) for r in group)} |"
                )
    lines += [
        "",
        "## Does the validation predict the test?",
        "",
        "Over every (category, configuration, seed) run and both its kept and its last checkpoint (the last when it differs): "
        "sign agreement between the validation gain and the test gain in image AUROC (pairs where both are non-zero), and "
        "Spearman's rank correlation.",
        "",
        "| detector | checkpoints | sign agreement | rank correlation |",
        "|---|---|---|---|",
    ]
    for m in models:
        pairs = [
            (r["validation_gain"], r["d_image_auroc"]) for r in kept + last if r["model"] == m and r["d_image_auroc"] is not None
        ]
        signed = [(v, t) for v, t in pairs if v != 0 and t != 0]
        agree = sum((v > 0) == (t > 0) for v, t in signed)
        rho = _spearman(*zip(*pairs)) if pairs else float("nan")
        lines.append(f"| {m} | {len(pairs)} | {agree}/{len(signed)} | {rho:.3f} |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["glad", "padim", "patchcore"])
    parser.add_argument(
        "--last-models",
        nargs="*",
        default=["padim"],
        help="Detectors also refit on the last step's backbone when it is not the kept one (for the agreement).",
    )
    parser.add_argument(
        "--configs", nargs="*", default=["default"], choices=list(CONFIGS), help="Configurations (none: the frozen rows only)."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--explore", nargs="*", default=[], choices=list(CONFIGS), help="Configurations run at the first seed only."
    )
    parser.add_argument(
        "--then-best-seeds", nargs="*", type=int, default=[], help="Seeds for the best configuration by validation."
    )
    parser.add_argument(
        "--set", dest="changes", nargs="*", default=[], metavar="KEY=VALUE", help="Changes for every configuration."
    )
    parser.add_argument(
        "--oracle", action="store_true", help="Also score every validated checkpoint on the test split (a diagnostic)."
    )
    parser.add_argument("--budget", type=float, default=float("inf"), help="Seconds after which no new unit starts.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Folder for the results file.")
    parser.add_argument("--name", default="finetune", help="Results file stem.")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="Only write <name>.md from these results files.")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="Only merge these results files into <name>.json.")
    args = parser.parse_args()
    if args.table or args.merge:
        files = [Path(f) if Path(f).exists() else RESULTS / f for f in args.table or args.merge]
        if args.merge:
            parts = [json.loads(f.read_text()) for f in files]
            merged = {
                "commands": [c for p in parts for c in p.get("commands", [p.get("command")])],
                "device": sorted({p["device"] for p in parts}),
                "labels": {name: v for p in parts for name, v in p.get("labels", {}).items()},
                "rows": [r for p in parts for r in p["rows"]],
            }
            return (RESULTS / f"{args.name}.json").write_text(json.dumps(merged, indent=1) + "\n")
        return write_table(files, RESULTS / f"{args.name}.md")
    from anomatune.apps.options import parse_pairs

    start, device = time.perf_counter(), resolve_device(args.device)
    workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    common = parse_pairs(args.changes)
    # the detectors' features: the pipeline's defaults, with the fine-tuning's backbone when --set changes it
    features = FeatureSettings().updated(**{k: v for k, v in common.items() if k in ("backbone", "image_size")})
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    header = {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "defaults": FinetuneSettings().to_dict(),
    }

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "image_scores"}), flush=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(header | {"rows": rows}, indent=1) + "\n")

    def in_budget() -> bool:
        return time.perf_counter() - start < args.budget

    baseline = {}

    def run_category(name: str, plan: list[tuple[str, int]]) -> None:
        """Load a category, score its frozen baseline (once), then fine-tune and score each (configuration, seed) of ``plan``."""
        models = sorted(set(args.models) | set(args.last_models))
        cat = Category(name, device, workers, features, models)
        header.setdefault("labels", {})[name] = cat.labels.astype(int).tolist()
        frozen = cat.features(None)
        for model in models:
            if (name, model) not in baseline:
                t = time.perf_counter()
                baseline[(name, model)] = cat.metrics(model, frozen)
                seconds = round(time.perf_counter() - t, 1)
                for seed in args.seeds:  # one row per seed, as the fine-tuned rows (the frozen backbone has no seed: they repeat)
                    record(
                        {
                            "dataset": name,
                            "config": None,
                            "model": model,
                            "backbone": "frozen",
                            "seed": seed,
                            **baseline[(name, model)],
                            "seconds": seconds,
                        }
                    )
        for config, seed in plan:
            if in_budget():
                run(cat, config, seed)

    def run(cat: Category, config: str, seed: int) -> None:
        changes = CONFIGS[config] | common | {"seed": seed}
        families = {k: changes.pop(k) for k in ("validation_families",) if k in changes}  # the validation's setting
        settings = FinetuneSettings().updated(**changes)
        curve: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp, oracle_curve(cat, args.models, curve) if args.oracle else nullcontext():
            t = time.perf_counter()
            report = finetune(
                cat.train,
                NEGATIVES,
                tmp,
                settings,
                validation=ValidationSettings(photos=str(VALIDATION_NEGATIVES)).updated(**families),
                device=device,
            )
            seconds = round(time.perf_counter() - t, 1)
            scores = {v["step"]: v["score"] for v in report["validation"]}
            last = max(scores)
            tune = {
                "finetune_seconds": seconds,
                "kept_step": report["kept_step"],
                "last_step": last,
                "fallback": report["fallback"],
                "collapsed": report["collapsed"],
            }
            weights = {"fine-tuned": (RunFolder(tmp) / FinetuneFolder.BACKBONE, report["kept_step"])}
            if report["kept_step"] != last:
                weights["last"] = (RunFolder(tmp) / FinetuneFolder.LAST_BACKBONE, last)
            for backbone, (path, step) in weights.items():
                features = None if step == 0 else cat.features(str(path), adaptor_only=settings.mode == "adaptor")
                for model in args.models if backbone == "fine-tuned" else args.last_models:
                    # a fallback's backbone is the frozen one, bit for bit: its metrics are the frozen row's
                    metrics = baseline[(cat.name, model)] if step == 0 else cat.metrics(model, features)
                    record(
                        {
                            "dataset": cat.name,
                            "config": config,
                            "model": model,
                            "backbone": backbone,
                            "seed": seed,
                            **metrics,
                            "validation_gain": round(scores[step] - scores[0], 5),
                            **tune,
                            **({"curve": curve} if curve and backbone == "fine-tuned" else {}),
                        }
                    )

    for name in args.datasets:  # one category in memory at a time
        if in_budget():
            plan = [(config, seed) for config in args.configs for seed in args.seeds]
            run_category(name, plan + [(config, args.seeds[0]) for config in args.explore])
    if args.then_best_seeds and args.configs and in_budget():
        gains = {
            c: statistics.mean(r["validation_gain"] for r in rows if r.get("config") == c and r["backbone"] == "fine-tuned")
            for c in args.configs
            if any(r.get("config") == c for r in rows)
        }
        best = max(gains, key=gains.get)
        print(f"best by mean validation gain: {best} ({gains[best]:+.5f})", flush=True)
        header["best_by_validation"] = {"config": best, "mean_validation_gain": gains}
        for name in args.datasets:
            if in_budget():
                run_category(name, [(best, seed) for seed in args.then_best_seeds])
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
