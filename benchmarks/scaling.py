"""How the cost grows with the work: fit time and peak memory against the number of training
images, and predict throughput against batch size, Ray workers and images already scored.

Training sets of 100 ... 10,000 images are built from transistor's 213 good training images
by a horizontal flip, a crop (90-100 % of the side) and a colour jitter (±5 % brightness,
contrast, saturation), seeded, and saved at 256 x 256 (the input size, so decoding the
1024 px originals does not dominate) under the git-ignored ``benchmarks/.cache/``. The test
split is transistor's own, read in place. Each fit runs in a fresh process (peak memory is
its ``ru_maxrss``: torch and the model included) with every default but the detector, on
this machine's CPU, then scores the test split.

    python benchmarks/scaling.py                      # everything (about an hour on 2 cores)
    python benchmarks/scaling.py --only fit --sizes 100 1000
    python benchmarks/scaling.py --only predict
    python benchmarks/scaling.py --only bound       # PatchCore's max_patches on transistor's own images

Writes ``results/scaling.json`` and ``.md``; finished cells are kept in the JSON, so a
stopped run continues where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, SQUARE, dataset, write_results

NAME = "scaling"
SIZES = (100, 300, 1000, 3000, 10000)
DETECTORS = ("glad", "padim", "patchcore")
CACHE = Path(__file__).parent / ".cache" / "scaling"
CHILD_TIMEOUT = 3600
BATCH_SIZES = (1, 8, 32)
RAY_WORKERS = (1, 2)
PREDICT_IMAGES = 1000  # images of each throughput cell
STREAM_IMAGES = 10000  # images of the cost-per-image-over-time measurement
STREAM_WINDOW = 1000
BOUND_CAPS = ("none", "100000")  # PatchCore's max_patches on transistor's ~196k patches (the default 500,000 keeps them all)


def augmented_pool(n: int) -> list[Path]:
    """``n`` seeded augmentations of transistor's training images, generated once."""
    import numpy as np
    from PIL import Image, ImageEnhance

    root, category = dataset("transistor")
    sources = sorted((root / category / "train" / "good").glob("*.png"))
    pool = CACHE / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    paths = [pool / f"{i:05d}.png" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        print(f"augmenting {len(missing)} images into {pool}", flush=True)
    cache: dict[int, Image.Image] = {}
    for i in missing:
        rng = np.random.default_rng(i)
        k = i % len(sources)
        if k not in cache:
            cache[k] = Image.open(sources[k]).convert("RGB")
        img = cache[k]
        if i >= len(sources) and rng.random() < 0.5:  # the first pass over the sources is left as it is
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = img.width * (rng.uniform(0.9, 1.0) if i >= len(sources) else 1.0)
        x0, y0 = rng.uniform(0, img.width - side), rng.uniform(0, img.height - side)
        img = img.resize((256, 256), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        if i >= len(sources):
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enhance(img).enhance(rng.uniform(0.95, 1.05))
        img.save(paths[i], compress_level=1)
    return paths


def category_of(n: int) -> Path:
    """An MVTec-layout root whose transistor has the first ``n`` augmented images and the real test split."""
    root, category = dataset("transistor")
    pool = augmented_pool(n)
    folder = CACHE / f"n{n}"
    good = folder / category / "train" / "good"
    if not good.is_dir() or len(list(good.iterdir())) != n:
        good.mkdir(parents=True, exist_ok=True)
        for p in pool:
            link = good / p.name
            if not link.exists():
                link.symlink_to(p)
        for part in ("test", "ground_truth"):
            link = folder / category / part
            if not link.exists():
                link.symlink_to(root / category / part)
    return folder


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def fit_and_score(root: Path, detector) -> tuple[dict, object]:
    """Fit on transistor's training images under ``root``, then score its test split: seconds, peak memory, metrics."""
    from anomatune.allocator import tune_allocator
    from anomatune.data.layouts import open_dataset
    from anomatune.pipeline.pipeline import Pipeline

    tune_allocator()
    start = time.perf_counter()
    pipeline = Pipeline(detector=detector, image_size=SQUARE, device="cpu").fit(
        open_dataset(data=str(root), category="transistor")
    )
    fit_s, fit_peak = time.perf_counter() - start, peak_gb()
    metrics = pipeline.score(open_dataset(data=str(root), category="transistor", split="test", image_size=pipeline.input_size))
    return {
        "fit_s": round(fit_s, 1),
        "peak_gb": fit_peak,
        **{k: round(metrics[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")},
    }, pipeline


def child_fit(detector: str, n: int) -> dict:
    """In a fresh process: fit on ``n`` augmented images, then score the test split."""
    cell, _ = fit_and_score(category_of(n), detector)
    return cell | {"images_per_s": round(n / cell["fit_s"], 1)}


def child_bound(max_patches: str) -> dict:
    """In a fresh process: PatchCore on transistor's own training images with ``max_patches`` (``none``: every patch)."""
    root, _ = dataset("transistor")
    cap = None if max_patches == "none" else int(max_patches)
    cell, pipeline = fit_and_score(root, {"name": "patchcore", "max_patches": cap})
    return cell | {"train_patches": pipeline.fit_record_.n_train * 1024}


def child_predict(run: str, images: int, batch: int, engine: str, workers: int) -> dict:
    """In a fresh process: predict ``images`` images (no PNGs) with the local engine or Ray; images per second."""
    import tempfile

    from anomatune.allocator import tune_allocator

    tune_allocator()
    paths = [str(p) for p in augmented_pool(images)]
    out = Path(tempfile.mkdtemp(prefix="scaling-predict-"))
    start = time.perf_counter()
    if engine == "ray":
        import ray

        from anomatune.distributed.batch import predict_on_ray
        from anomatune.distributed.settings import EngineSettings

        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter() - start
        predict_on_ray(
            run,
            paths,
            out / "p",
            images=False,
            engine=EngineSettings(engine="ray", workers=workers),
            device="cpu",
            batch_size=batch,
        )
        seconds = time.perf_counter() - start
        return {
            "seconds": round(seconds, 1),
            "ray_start_s": round(started, 1),
            "images_per_s": round(images / seconds, 1),
            "images_per_s_after_start": round(images / (seconds - started), 1),
        }
    from anomatune.inference.predict import predict

    predict(run, paths, out / "p", images=False, device="cpu", batch_size=batch)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "images_per_s": round(images / seconds, 1), "peak_gb": peak_gb()}


def child_stream(run: str, images: int, window: int) -> dict:
    """In a fresh process: score ``images`` images batch by batch as ``predict`` does; rate and memory per window."""
    from anomatune.allocator import tune_allocator
    from anomatune.inference.predict import load_for_predict, predict_rows

    tune_allocator()
    paths = augmented_pool(images)
    pipeline, threshold = load_for_predict(run, None, device="cpu", batch_size=8)
    windows, start, done = [], time.perf_counter(), 0
    for _ in predict_rows(pipeline, paths, threshold, None):
        done += 1
        if done % window == 0:
            now = time.perf_counter()
            windows.append({"scored": done, "images_per_s": round(window / (now - start), 1), "peak_gb": peak_gb()})
            start = now
    return {"windows": windows}


def run_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {CHILD_TIMEOUT} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fitted_run() -> str:
    """A PaDiM run on transistor's own training images, for the predict measurements."""
    run = CACHE / "run_padim"
    if not (run / "aliases.json").is_file():  # a model folder, written once
        from anomatune.data.layouts import open_dataset
        from anomatune.pipeline.pipeline import Pipeline

        root, category = dataset("transistor")
        Pipeline(detector="padim", image_size=SQUARE, device="cpu").fit(open_dataset(data=str(root), category=category)).save(run)
    return str(run)


def markdown(results: dict) -> str:
    lines = [
        "# How the cost grows (transistor, augmented; 2 CPU cores)",
        "",
        "Reproduce: `python benchmarks/scaling.py`. Each fit in a fresh process, all defaults but the detector, 256 x 256.",
        "Peak memory is the process's maximum resident set (torch and the model included).",
        "",
        "## Fit time and peak memory against training images",
        "",
        "| detector | images | fit s | images/s | peak GB | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fits = results.get("fit", {})
    for key in sorted(fits, key=lambda k: (int(k.split("/")[1]), DETECTORS.index(k.split("/")[0]))):
        detector, n = key.split("/")
        cell = fits[key]
        if "error" in cell:
            lines.append(f"| {detector} | {n} | failed: {cell['error']} | | | | | |")
            continue
        lines.append(
            f"| {detector} | {n} | {cell['fit_s']} | {cell['images_per_s']} | {cell['peak_gb']} | {cell['image_auroc']} | "
            f"{cell['pixel_auroc']} | {cell['aupro']} |"
        )
    bound = results.get("bound", {})
    if bound:
        lines += [
            "",
            "## PatchCore's patch bound on transistor's own training images (213, ~196k patches after the hold-out)",
            "",
            "| max_patches | fit s | peak GB | image AUROC | pixel AUROC | AUPRO |",
            "|---|---|---|---|---|---|",
        ]
        for cap, cell in bound.items():
            lines.append(
                f"| {cap} | "
                + (
                    f"failed: {cell['error']} | | | | |"
                    if "error" in cell
                    else f"{cell['fit_s']} | {cell['peak_gb']} | {cell['image_auroc']} | {cell['pixel_auroc']} | {cell['aupro']} |"
                )
            )
    predict = results.get("predict", {})
    if predict:
        lines += [
            "",
            f"## Predict throughput ({PREDICT_IMAGES} images, PaDiM, no PNGs, whole command incl. start-up)",
            "",
            "| engine | batch | workers | images/s | note |",
            "|---|---|---|---|---|",
        ]
        for key, cell in predict.items():
            engine, batch, workers = key.split("/")
            note = cell.get("error") or (
                f"Ray start {cell['ray_start_s']} s; {cell['images_per_s_after_start']} images/s after it"
                if "ray_start_s" in cell
                else f"peak {cell['peak_gb']} GB"
            )
            lines.append(f"| {engine} | {batch} | {workers} | {cell.get('images_per_s', '')} | {note} |")
    stream = results.get("stream", {}).get("windows")
    if stream:
        lines += [
            "",
            f"## Cost per image as images are scored ({STREAM_IMAGES} images, local engine, batch 8)",
            "",
            "| images scored | images/s over the last " + str(STREAM_WINDOW) + " | peak GB so far |",
            "|---|---|---|",
        ]
        lines += [f"| {w['scored']} | {w['images_per_s']} | {w['peak_gb']} |" for w in stream]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", choices=("fit", "bound", "predict", "stream"), action="append", help="Only these parts (repeatable)."
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="Training set sizes of the fit part.")
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    parser.add_argument("--fresh", action="store_true", help="Forget the finished cells of results/scaling.json.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "fit":
            result = child_fit(rest[0], int(rest[1]))
        elif kind == "bound":
            result = child_bound(rest[0])
        elif kind == "predict":
            result = child_predict(rest[0], int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
        else:
            result = child_stream(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    path = RESULTS / f"{NAME}.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    parts = args.only or ["fit", "bound", "predict", "stream"]
    augmented_pool(max([*args.sizes, PREDICT_IMAGES, STREAM_IMAGES if "stream" in parts else 0]))

    def save():
        write_results(NAME, results, markdown(results))

    if "fit" in parts:
        for n in args.sizes:
            for detector in args.detectors:
                key = f"{detector}/{n}"
                if key in results.setdefault("fit", {}) and "error" not in results["fit"][key]:
                    continue
                print(f"fit {key} ...", flush=True)
                results["fit"][key] = run_child("fit", detector, n)
                print(f"  {results['fit'][key]}", flush=True)
                save()
    if "bound" in parts:
        for cap in BOUND_CAPS:
            print(f"bound {cap} ...", flush=True)
            results.setdefault("bound", {})[cap] = run_child("bound", cap)
            print(f"  {results['bound'][cap]}", flush=True)
            save()
    if "predict" in parts:
        run = fitted_run()
        cells = [("local", b, 1) for b in BATCH_SIZES] + [("ray", 8, w) for w in RAY_WORKERS]
        for engine, batch, workers in cells:
            key = f"{engine}/{batch}/{workers}"
            print(f"predict {key} ...", flush=True)
            results.setdefault("predict", {})[key] = run_child("predict", run, PREDICT_IMAGES, batch, engine, workers)
            print(f"  {results['predict'][key]}", flush=True)
            save()
    if "stream" in parts:
        print("stream ...", flush=True)
        results["stream"] = run_child("stream", fitted_run(), STREAM_IMAGES, STREAM_WINDOW)
        save()


if __name__ == "__main__":
    main()
