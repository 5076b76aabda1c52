"""Does the label-free validation predict the test? And does ``--detector auto`` pay?

For each category: the detector search's candidates, each fitted on the good training
images the search fits on, scored on the validation set (per anomaly family and the
aggregate) and on the test split (image AUROC, AUPRO). Reported:

- per family and for the aggregate, the Spearman rank correlation between the validation
  score and the test image AUROC across candidates, within each category, and its mean;
- the regret of ``auto`` (best candidate's test image AUROC minus the picked one's);
- the six-category mean of ``auto`` (the refit winner, what ``fit --detector auto`` saves)
  against each fixed candidate refit the same way is not run: the fixed candidates' test
  metrics here are those of the search's fits, the same for all;
- the time of the whole ``fit --detector auto`` (search + refit of the winner);
- with 1, 3 and 5 real defects drawn from the test defects (removed from that test set,
  3 draws each), the same Spearman with them as one more validation family.

Run: ``python benchmarks/validation.py`` (all six categories, every candidate, 256x256 squashed as anomalib's
protocol; ~1 h on 2 CPU cores), or as ``fit`` runs the search, the aspect ratio kept (~1 h with GLAD):
``python benchmarks/validation.py --image-size 256 --search-stages default --name validation_aspect``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr
from torch.utils.data import DataLoader

from anomatune.data.datasets import MVTecAD, collate
from anomatune.metrics import image_auroc, pixel_curves, pixel_metrics
from anomatune.pipeline.pipeline import Pipeline
from anomatune.pipeline.scoring import score_dataset
from anomatune.pipeline.settings import PipelineSettings
from anomatune.validation.scoring import detector_outputs, validation_metrics
from anomatune.validation.search import DetectorSearch, FeatureView
from anomatune.validation.sets import GOOD, REAL, ValidationSet
from anomatune.validation.settings import DEFAULT, FINE, SEARCH_DETECTORS, ValidationSettings
from common import DATASETS, NEGATIVES, RESULTS, SHARED, SQUARE, command_line, dataset, write_results

PHOTOS = SHARED / "natural" / "imagen"  # disjoint from the fine-tuning's negatives (imagenet_samples)
REAL_COUNTS = (1, 3, 5)
REAL_DRAWS = 3
EVERY_DETECTOR, EVERY_STAGE_SET = ",".join(SEARCH_DETECTORS), ",".join((DEFAULT, FINE))  # every candidate by default


def test_outputs(run, loader, cache: dict, postprocess) -> tuple[np.ndarray, np.ndarray]:
    """Maps and scores of the test split through a search candidate (features cached per stage set)."""
    key = (run.view, None if run.projection is None else id(run.projection[0]))
    if key not in cache:
        cache[key] = torch.cat([run.features(batch["image"]).cpu() for batch in loader])
    maps, scores = detector_outputs(run.detector, cache[key], tuple(loader.dataset.size_hw), postprocess)
    return maps.numpy(), scores.numpy()


def rounded(scores) -> list[float]:
    """Per-image scores kept in the results (for ensembles computed afterwards), at float32's precision."""
    return [float(f"{v:.7g}") for v in np.asarray(scores, float)]


def best_on_validation(rows: list[dict]) -> dict:
    """The candidate the search picks among ``rows``: the highest validation score, the first of equals."""
    return max(rows, key=lambda c: c["score"])


def ensemble(result: dict, size: int = 2) -> dict:
    """The z-normalised mean of the ``size`` best candidates on validation, as one more candidate: each one's image
    scores standardised by its held-out good validation images, its validation aggregate (mean image AUROC over
    the families) and test image AUROC computed from the stored scores, no refit."""
    rows = sorted(result["candidates"], key=lambda r: -r["score"])[:size]
    groups = np.array(result["validation_groups"])
    good = groups == GOOD

    def z(row: dict, split: str) -> np.ndarray:
        reference = np.asarray(row["scores"]["validation"])[good]
        return (np.asarray(row["scores"][split]) - reference.mean()) / (reference.std() + 1e-12)

    validation = np.mean([z(r, "validation") for r in rows], axis=0)
    families = [f for f in dict.fromkeys(groups) if f != GOOD]
    score = float(np.mean([image_auroc(groups[good | (groups == f)] == f, validation[good | (groups == f)]) for f in families]))
    test = float(image_auroc(np.array(result["test_labels"]), np.mean([z(r, "test") for r in rows], axis=0)))
    return {"members": [r["candidate"] for r in rows], "score": score, "test_image_auroc": test}


def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def with_real(valset: ValidationSet, val_outputs, picked_maps, picked_scores, picked_masks: np.ndarray | None) -> dict:
    """The validation metrics with ``picked`` test defects added as the 'real' family (maps at the same size)."""
    n = len(picked_scores)
    extended = ValidationSet(
        valset.images,  # not read by validation_metrics: the outputs are given
        torch.cat([valset.labels, torch.ones(n, dtype=torch.long)]),
        torch.cat(
            [
                valset.masks,
                torch.zeros(n, 1, *valset.masks.shape[-2:])
                if picked_masks is None
                else torch.from_numpy(picked_masks).float()[:, None],
            ]
        ),
        valset.groups + [REAL] * n,
        torch.cat([valset.has_masks, torch.full((n,), picked_masks is not None)]),
    )
    maps = torch.cat([val_outputs[0], torch.from_numpy(picked_maps)])
    scores = torch.cat([val_outputs[1], torch.from_numpy(picked_scores)])
    return validation_metrics(extended, maps, scores)


def category(name: str, photos: bool, image_size, validation: ValidationSettings) -> dict:
    root, cat = dataset(name)
    train, test = MVTecAD(root, cat, "train", image_size=image_size), MVTecAD(root, cat, "test", image_size=image_size)
    settings = PipelineSettings().updated(image_size=image_size)
    validation = validation.updated(validation_photos=str(PHOTOS) if photos else None)
    search = DetectorSearch(settings, validation)  # the pools of the tables are subsets of these candidates
    start = time.perf_counter()
    resized, fit_index, valset = search.prepare(train)
    test = test.at_size(resized.size_hw)
    loader = DataLoader(test, batch_size=8, collate_fn=collate)
    labels = test.labels
    masks = torch.cat([b["mask"] for b in loader]).numpy().astype(bool)[:, 0] if test.has_masks else None
    cache, rows, outputs = {}, [], []
    test_seconds = 0.0
    train_maps, validation_maps = search.stage_maps(resized, valset)
    for run in search.runs(train_maps, fit_index, validation_maps, valset, start):
        began = time.perf_counter()
        maps, scores = test_outputs(run, loader, cache, settings.postprocess)
        metrics = {"image_auroc": image_auroc(labels, scores)} | pixel_metrics(pixel_curves(masks, maps))
        rows.append({**run.row, "test": metrics, "scores": {"validation": rounded(run.outputs[1]), "test": rounded(scores)}})
        outputs.append((run.outputs, maps, scores))
        test_seconds += time.perf_counter() - began
        logging.info("%s %s: validation %.4f, test %.4f", name, run.row["candidate"], run.row["score"], metrics["image_auroc"])
    search_seconds = time.perf_counter() - start - test_seconds  # what fit --detector auto spends before the refit
    del cache
    pick = int(np.argmax([r["score"] for r in rows]))
    winner = search.candidates[pick]
    began = time.perf_counter()
    chosen = winner.settings(settings, search.layers_)
    refit = Pipeline(chosen).fit(train, raw_features=train_maps.features(FeatureView.of(chosen.features)))
    refit_seconds = time.perf_counter() - began
    auto = score_dataset(refit, test).metrics
    test_auroc = [r["test"]["image_auroc"] for r in rows]
    result = {
        "dataset": name,
        "candidates": rows,
        "validation_groups": list(valset.groups),
        "test_labels": [int(v) for v in labels],
        "auto": {"candidate": winner.name, "search": rows[pick]["test"], "refit": {k: auto[k] for k in ("image_auroc", "aupro")}},
        "regret": float(max(test_auroc) - test_auroc[pick]),
        "seconds": {"search": round(search_seconds, 1), "refit": round(refit_seconds, 1)},
        "spearman": {
            "aggregate": spearman([r["score"] for r in rows], test_auroc),
            "aggregate_vs_aupro": spearman([r["score"] for r in rows], [r["test"]["aupro"] for r in rows]),
            "aupro_aggregate": spearman([r["aupro"] for r in rows], test_auroc),
            **{f: spearman([r["families"][f]["image_auroc"] for r in rows], test_auroc) for f in valset.families},
        },
    }
    defective = np.flatnonzero(labels == 1)
    real = {}
    for count in REAL_COUNTS:
        values = []
        for draw in range(REAL_DRAWS):
            picked = np.random.default_rng(1000 * count + draw).choice(defective, size=min(count, len(defective)), replace=False)
            rest = np.setdiff1d(np.arange(len(labels)), picked)
            picked_masks = None if masks is None else masks[picked]
            scores_val, scores_test = [], []
            for val_out, maps, scores in outputs:
                scores_val.append(with_real(valset, val_out, maps[picked], scores[picked], picked_masks)["score"])
                scores_test.append(image_auroc(labels[rest], scores[rest]))
            values.append(spearman(scores_val, scores_test))
        real[str(count)] = float(np.nanmean(values))
    result["spearman_with_real"] = real
    return result


def markdown(results: list[dict], command: str) -> str:
    families = list(results[0]["spearman"])
    lines = [
        "# Label-free validation: does it predict the test?",
        "",
        f"Command: `{command}` (2-core CPU; inputs squashed to 256x256 unless the command gives a short side, the aspect ratio kept; candidates fitted on at most "
        f"{ValidationSettings().fit_images} good training images, as in the search).",
        "",
        "## Spearman rank correlation between validation and test image AUROC across candidates, per category",
        "",
        "| dataset | " + " | ".join(families) + " | with 1 / 3 / 5 real defects |",
        "|---|" + "---|" * (len(families) + 1),
    ]
    for r in results:
        cells = [f"{r['spearman'][f]:.2f}" for f in families]
        real = " / ".join(f"{r['spearman_with_real'][k]:.2f}" for k in map(str, REAL_COUNTS))
        lines.append(f"| {r['dataset']} | " + " | ".join(cells) + f" | {real} |")
    mean = [np.nanmean([r["spearman"][f] for r in results]) for f in families]
    real_mean = " / ".join(f"{np.nanmean([r['spearman_with_real'][k] for r in results]):.2f}" for k in map(str, REAL_COUNTS))
    lines.append("| **mean** | " + " | ".join(f"**{m:.2f}**" for m in mean) + f" | {real_mean} |")
    names = [c["candidate"] for c in results[0]["candidates"]]
    lines += [
        "",
        "## Test image AUROC of every candidate, and of the search over all of them (auto)",
        "",
        "| dataset | " + " | ".join(names) + " | auto picks | auto (search fit) | auto (refit) | regret | fit auto s |",
        "|---|" + "---|" * (len(names) + 6),
    ]
    for r in results:
        cells = [f"{c['test']['image_auroc']:.4f}" for c in r["candidates"]]
        a = r["auto"]
        seconds = r["seconds"]["search"] + r["seconds"]["refit"]
        lines.append(
            f"| {r['dataset']} | "
            + " | ".join(cells)
            + f" | {a['candidate']} | {a['search']['image_auroc']:.4f} | {a['refit']['image_auroc']:.4f} | {r['regret']:.4f} | {seconds:.0f} |"
        )
    means = [np.mean([r["candidates"][i]["test"]["image_auroc"] for r in results]) for i in range(len(names))]
    auto_search = np.mean([r["auto"]["search"]["image_auroc"] for r in results])
    auto_refit = np.mean([r["auto"]["refit"]["image_auroc"] for r in results])
    lines.append(
        "| **mean** | "
        + " | ".join(f"{m:.4f}" for m in means)
        + f" | | **{auto_search:.4f}** | **{auto_refit:.4f}** | {np.mean([r['regret'] for r in results]):.4f} | |"
    )
    lines += [
        "",
        "## Validation score (aggregate) of every candidate",
        "",
        "| dataset | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for r in results:
        lines.append(f"| {r['dataset']} | " + " | ".join(f"{c['score']:.4f}" for c in r["candidates"]) + " |")
    first = names[0]
    lines += [
        "",
        f"## Validation image AUROC per family of the first candidate ({first})",
        "",
        "| dataset | " + " | ".join(families[3:]) + " |",
        "|---|" + "---|" * len(families[3:]),
    ]
    for r in results:
        row = next(c for c in r["candidates"] if c["candidate"] == first)
        lines.append(f"| {r['dataset']} | " + " | ".join(f"{row['families'][f]['image_auroc']:.3f}" for f in families[3:]) + " |")
    return "\n".join(lines + aggregate_table(results) + pool_table(results) + ensemble_table(results)) + "\n"


def aggregates(result: dict) -> dict[str, list[float]]:
    """Other ways to join the families into one score, from the stored rows (no refit): which ranks best?"""
    rows = result["candidates"]
    families = list(rows[0]["families"])
    auroc = np.array([[r["families"][f]["image_auroc"] for f in families] for r in rows])
    aupro = np.array([[r["families"][f]["aupro"] for f in families] for r in rows])
    ranks = rankdata(auroc, axis=0)  # per family, ties averaged
    out = {
        "mean image AUROC (the default)": auroc.mean(1),
        "mean rank over families": ranks.mean(1),
        "mean of image AUROC and AUPRO": np.nanmean(np.c_[auroc, aupro], 1),
        "worst family": auroc.min(1),
    }
    for j, family in enumerate(families):
        out[f"without {family}"] = np.delete(auroc, j, axis=1).mean(1)
    return {k: list(map(float, v)) for k, v in out.items()}


def aggregate_table(results: list[dict]) -> list[str]:
    """Spearman of each aggregate with the test image AUROC, per category and its mean."""
    names = list(aggregates(results[0]))
    lines = [
        "",
        "## Other aggregates of the same families (Spearman with the test image AUROC, per category)",
        "",
        "| aggregate | " + " | ".join(r["dataset"] for r in results) + " | mean |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for name in names:
        values = [spearman(aggregates(r)[name], [c["test"]["image_auroc"] for c in r["candidates"]]) for r in results]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.nanmean(values):.2f} |")
    return lines


def ensemble_table(results: list[dict]) -> list[str]:
    """The two best candidates on validation, z-normalised and averaged: would the search pick it, and should it?"""
    if not all("scores" in c for r in results for c in r["candidates"]):
        return []
    lines = [
        "",
        "## A z-normalised ensemble of the two best candidates on validation (from the stored scores, no refit)",
        "",
        "| dataset | members | validation | best single on validation | test image AUROC | pick's test | best candidate's test |",
        "|---|---|---|---|---|---|---|",
    ]
    gains = []
    for r in results:
        e = ensemble(r)
        pick = best_on_validation(r["candidates"])
        best = max(c["test"]["image_auroc"] for c in r["candidates"])
        chosen = e["test_image_auroc"] if e["score"] > pick["score"] else pick["test"]["image_auroc"]
        gains.append(chosen - pick["test"]["image_auroc"])
        lines.append(
            f"| {r['dataset']} | {' + '.join(e['members'])} | {e['score']:.4f} | {pick['score']:.4f} | "
            f"{e['test_image_auroc']:.4f} | {pick['test']['image_auroc']:.4f} | {best:.4f} |"
        )
    lines += [
        "",
        f"With the ensemble in the pool (picked where its validation is higher), the mean test image AUROC of the pick changes by {np.mean(gains):+.4f}.",
    ]
    return lines


POOLS = {
    "all": None,
    "without GLAD": ("padim all default", "patchcore all default", "padim all fine", "patchcore all fine"),
    "default stages": ("padim all default", "glad pca64 default", "glad all default", "patchcore all default"),
    "PaDiM and PatchCore, default stages (the search's default pool)": ("padim all default", "patchcore all default"),
    "PaDiM, GLAD PCA-64 and PatchCore, default stages": ("padim all default", "glad pca64 default", "patchcore all default"),
}


def pool_table(results: list[dict]) -> list[str]:
    """Smaller pools, from the same rows: the pick within each, its test image AUROC, its regret against the best of
    every candidate, and the candidates' own seconds (fit and validation scoring; the fixed costs come on top)."""
    lines = [
        "",
        "## Smaller pools, from the same rows (the pick within the pool; regret against the best of all candidates)",
        "",
        "| pool | mean test image AUROC of the pick | mean regret | worst regret | categories with regret <= 0.01 | candidates' s (median) |",
        "|---|---|---|---|---|---|",
    ]
    present = {c["candidate"] for c in results[0]["candidates"]}
    for pool, names in POOLS.items():
        if names is not None and not set(names) <= present:
            continue
        picked, regrets, seconds = [], [], []
        for r in results:
            rows = [c for c in r["candidates"] if names is None or c["candidate"] in names]
            pick = best_on_validation(rows)
            picked.append(pick["test"]["image_auroc"])
            regrets.append(max(c["test"]["image_auroc"] for c in r["candidates"]) - picked[-1])
            seconds.append(sum(c["seconds"] for c in rows))
        lines.append(
            f"| {pool} | {np.mean(picked):.4f} | {np.mean(regrets):.4f} | {max(regrets):.4f} | "
            f"{sum(g <= 0.01 for g in regrets)} of {len(results)} | {np.median(seconds):.0f} |"
        )
    return lines


def not_applicable_as_nan(mapping: dict) -> dict:
    """A stored ``null`` (a value that does not apply) back to NaN, as the tables are computed with it."""
    return {k: float("nan") if v is None else v for k, v in mapping.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--no-photos", action="store_true", help="procedural textures instead of photos (imagen)")
    parser.add_argument(
        "--image-size",
        default=SQUARE,
        help="input size: WxH (squashed, anomalib's protocol) or a short side (the aspect ratio kept, as the product does)",
    )
    parser.add_argument("--search-detectors", default=EVERY_DETECTOR, help="the candidates' detectors (the search's option)")
    parser.add_argument("--search-stages", default=EVERY_STAGE_SET, help="the candidates' stage sets (the search's option)")
    parser.add_argument("--name", default="validation")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the Markdown from results/NAME.json, no run")
    args = parser.parse_args()
    if args.tables_only:
        stored = json.loads((RESULTS / f"{args.name}.json").read_text(), object_hook=not_applicable_as_nan)
        command = stored.get("command", "python benchmarks/validation.py")
        write_results(args.name, {"command": command, "results": stored["results"]}, markdown(stored["results"], command))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    assert NEGATIVES != PHOTOS
    validation = ValidationSettings().updated(search_detectors=args.search_detectors, search_stages=args.search_stages)
    results, command = [], command_line()
    for name in args.datasets:
        results.append(category(name, not args.no_photos, args.image_size, validation))
        write_results(args.name, {"command": command, "results": results}, markdown(results, command))


if __name__ == "__main__":
    main()
