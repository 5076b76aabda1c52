"""Serving under load, and the engines on this CPU.

1. Load: ``anomatune serve`` (the default detector, GLAD, fitted on transistor at 256 x 256,
   torch engine) in its own process; 8 client threads each send 200 requests of one
   transistor test image (the 1024 px PNG as a camera would send it; overlay and mask
   come back as base64 PNGs). Errors, p50 / p99 latency and images/s, with batching on
   (``--max-batch 8 --max-wait-ms 5``) and off (``--max-batch 1``), next to the
   ``predict`` command on the same number of images (whole command, start-up included).
2. Engines: the run's forward pass (images already decoded and resized) in eager torch,
   ONNX Runtime and OpenVINO, at batch 1 and 8: images/s, best of 3 passes.

    python benchmarks/serve.py             # about 10 minutes on 2 cores

Writes ``results/serve.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ANOMATUNE, RESULTS, SQUARE, dataset, serving, write_results

NAME = "serve"
CACHE = Path(__file__).parent / ".cache" / "serve"
CLIENTS, REQUESTS = 8, 200
ENGINE_PASSES, ENGINE_IMAGES = 3, 32


def fitted_run() -> Path:
    run = CACHE / "run_glad"
    if not (run / "aliases.json").is_file():  # a model folder, written once
        from anomatune.data.layouts import open_dataset
        from anomatune.pipeline.pipeline import Pipeline

        root, category = dataset("transistor")
        Pipeline(image_size=SQUARE, device="cpu").fit(open_dataset(data=str(root), category=category)).save(run)
    return run


def test_images() -> list[Path]:
    root, category = dataset("transistor")
    return sorted((root / category / "test").rglob("*.png"))


def load_test(run: Path, max_batch: int) -> dict:
    import httpx

    with serving(run, "--max-batch", str(max_batch), "--max-wait-ms", "5", "--device", "cpu") as (_, url):
        images = [p.read_bytes() for p in test_images()]

        def client(k: int) -> tuple[list[float], int]:
            latencies, errors = [], 0
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(REQUESTS):
                    data = images[(k * REQUESTS + i) % len(images)]
                    start = time.perf_counter()
                    answer = c.post("/predict", files=[("file", (f"{k}_{i}.png", data, "image/png"))])
                    latencies.append(time.perf_counter() - start)
                    errors += answer.status_code != 200
            return latencies, errors

        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(client, range(CLIENTS)))
        seconds = time.perf_counter() - start
        latencies = sorted(x for lat, _ in outcomes for x in lat)
        health = httpx.get(url + "/health").json()
    n = len(latencies)
    return {
        "requests": n,
        "errors": sum(e for _, e in outcomes),
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * latencies[min(n - 1, int(0.99 * n))], 1),
        "mean_batch": health["mean_batch"],
    }


def predict_command(run: Path, n: int) -> dict:
    paths = [str(p) for p in (test_images() * (n // len(test_images()) + 1))[:n]]
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "list.csv"
        manifest.write_text("path\n" + "\n".join(paths) + "\n")
        start = time.perf_counter()
        subprocess.run(
            [str(ANOMATUNE), "predict", str(run), str(manifest), "--out", f"{folder}/p", "--device", "cpu"],
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 2)}


def engines(run: Path) -> dict:
    import torch

    from anomatune.allocator import tune_allocator
    from anomatune.data.images import image_to_tensor, read_image
    from anomatune.serve.models import ServedModel

    tune_allocator()
    results = {}
    for runtime in ("torch", "onnx", "openvino"):
        model = ServedModel.load(run, runtime, "cpu")
        input_size = model.pipeline.input_size
        batch = torch.stack([image_to_tensor(read_image(p), input_size) for p in test_images()[:ENGINE_IMAGES]])
        for size in (1, 8):
            chunks = torch.split(batch, size)
            model.forward(chunks[0])  # warm-up
            best = float("inf")
            for _ in range(ENGINE_PASSES):
                start = time.perf_counter()
                for chunk in chunks:
                    model.forward(chunk)
                best = min(best, time.perf_counter() - start)
            results[f"{runtime}/{size}"] = round(len(batch) / best, 1)
            print(f"  {runtime} batch {size}: {results[f'{runtime}/{size}']} images/s", flush=True)
    return results


def markdown(results: dict) -> str:
    lines = [
        "# Serving on this machine (2 CPU cores)",
        "",
        "Reproduce: `python benchmarks/serve.py`. GLAD (the default, PCA-64) fitted on transistor at 256 x 256.",
        "",
        f"## Load: {CLIENTS} clients x {REQUESTS} requests, one 1024 px PNG each, overlay and mask returned (base64)",
        "",
        "| server | errors | images/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for name, cell in results.get("load", {}).items():
        lines.append(
            f"| {name} | {cell['errors']} / {cell['requests']} | {cell['images_per_s']} | {cell['p50_ms']} | {cell['p99_ms']} | "
            f"{cell['mean_batch']} |"
        )
    if "predict" in results:
        cell = results["predict"]
        lines += [
            "",
            f"`anomatune predict` on {cell['images']} of the same images (whole command, start-up and PNGs included): "
            f"{cell['images_per_s']} images/s ({cell['seconds']} s).",
        ]
    if "engines" in results:
        lines += [
            "",
            "## Engines: the forward pass (decoded, resized images), images/s, best of 3",
            "",
            "| engine | batch 1 | batch 8 |",
            "|---|---|---|",
        ]
        for runtime in ("torch", "onnx", "openvino"):
            lines.append(
                f"| {runtime} | {results['engines'].get(f'{runtime}/1', '')} | {results['engines'].get(f'{runtime}/8', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("load", "predict", "engines"), action="append")
    args = parser.parse_args()
    parts = args.only or ["load", "predict", "engines"]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    run = fitted_run()
    path = RESULTS / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}  # --only keeps the other parts' results
    if "load" in parts:
        for name, max_batch in (("batching on (max 8, 5 ms)", 8), ("batching off", 1)):
            print(f"load: {name} ...", flush=True)
            results.setdefault("load", {})[name] = load_test(run, max_batch)
            print(f"  {results['load'][name]}", flush=True)
            write_results(NAME, results, markdown(results))
    if "predict" in parts:
        results["predict"] = predict_command(run, CLIENTS * REQUESTS)
        print(f"predict: {results['predict']}", flush=True)
    if "engines" in parts:
        print("engines ...", flush=True)
        results["engines"] = engines(run)
    write_results(NAME, results, markdown(results))


if __name__ == "__main__":
    main()
