"""Peak memory of one large image, accepted or refused: ``predict`` and ``serve`` at 1, 10, 40, 64 and 144 megapixels.

A run (PaDiM on the demo's brick images, 256 px, a learnt threshold) scores one image of
each size: the brick texture tiled to the size (a product-like PNG, compressed as a
camera's would be). Each row is a fresh process, so its peak resident memory (RSS) is the
image's cost plus the process's start-up (the 0-megapixel row: the same command with no
image). ``predict``: the whole command, overlay and mask written. ``serve``: the server's
peak after it answered one ``POST /predict`` of the image (overlay and mask as base64).
Rows run at the default ``--max-pixels`` and, for what is refused there, with the budget
(and serve's ``--max-side``) raised to accept it, so the table shows what the default
protects against.

    python benchmarks/limits.py            # about 5 minutes on 2 cores

Writes ``results/limits.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import ANOMATUNE, command_line, serving, write_results

NAME = "limits"
CACHE = Path(__file__).parent / ".cache" / "limits"
MEGAPIXELS = (1, 10, 40, 64, 144)  # 64: the default --max-pixels itself


def fitted_run() -> Path:
    run = CACHE / "run"
    if not (run / "aliases.json").is_file():  # a model folder, written once
        from anomatune import Pipeline, open_dataset
        from anomatune.apps.demo import build_dataset

        root = build_dataset(CACHE / "data")
        Pipeline(detector="padim", image_size=256, device="cpu").fit(open_dataset(data=root, category="brick")).save(run)
    return run


def image_of(megapixels: int) -> Path:
    """The brick texture tiled to a square of ``megapixels``, as a PNG (made once)."""
    import numpy as np
    from PIL import Image

    path = CACHE / f"{megapixels}mp.png"
    if not path.is_file():
        from skimage import data

        path.parent.mkdir(parents=True, exist_ok=True)
        tile = np.stack([data.brick()] * 3, axis=-1)
        side = round((megapixels * 1e6) ** 0.5)
        reps = -(-side // tile.shape[0])
        Image.fromarray(np.tile(tile, (reps, reps, 1))[:side, :side]).save(path, compress_level=1)
    return path


def peak_of(command: list[str]) -> tuple[float, int, str]:
    """Peak RSS in GB, exit code and the last line of stderr of a command run to its end."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    err = process.stderr.read().strip().splitlines()
    return usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status), err[-1] if err else ""


def predict_row(run: Path, megapixels: int, max_pixels: int | None, out: Path) -> dict:
    image = image_of(megapixels) if megapixels else None
    command = [str(ANOMATUNE), "predict", str(run), *([str(image)] if image else []), "--out", str(out), "--device", "cpu"]
    if not image:  # start-up alone: the run's own (tiny) test split
        command = [str(ANOMATUNE), "predict", str(run), "--out", str(out), "--device", "cpu", "--no-images"]
    command += ["--max-pixels", str(max_pixels)] if max_pixels else []
    start = time.perf_counter()
    peak, code, last = peak_of(command)
    outcome = "ok" if code == 0 else last
    if code == 1 and "megapixels accepted" in (out / "results.csv").read_text():  # a row with its error
        outcome = "refused (a row with its error)"
    return {
        "tool": "predict",
        "megapixels": megapixels,
        "max_pixels": max_pixels,
        "peak_gb": round(peak, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "outcome": outcome,
    }


def vm_hwm(pid: int) -> float:
    """The peak RSS of a running process, in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM")


def serve_row(run: Path, megapixels: int, max_pixels: int | None) -> dict:
    import httpx

    options = ["--device", "cpu", "--max-request-mb", "1000"]
    options += ["--max-pixels", str(max_pixels), "--max-side", "20000"] if max_pixels else []
    with serving(run, *options) as (server, url):
        start = time.perf_counter()
        status = 200
        if megapixels:
            image = image_of(megapixels)
            with open(image, "rb") as f:
                status = httpx.post(url + "/predict", files=[("file", (image.name, f, "image/png"))], timeout=600).status_code
        return {
            "tool": "serve",
            "megapixels": megapixels,
            "max_pixels": max_pixels,
            "peak_gb": round(vm_hwm(server.pid), 2),
            "seconds": round(time.perf_counter() - start, 1),
            "outcome": "ok" if status == 200 else "refused (413)" if status == 413 else f"HTTP {status}",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=int, nargs="+", default=list(MEGAPIXELS))
    parser.add_argument("--raised", type=int, default=150_000_000, help="--max-pixels of the rows the default refuses.")
    args = parser.parse_args()
    from anomatune.data.settings import MAX_PIXELS

    run = fitted_run()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, megapixels in enumerate([0, *args.megapixels]):
            budgets = [None] + ([args.raised] if megapixels * 1e6 > MAX_PIXELS else [])
            for max_pixels in budgets:
                for row in (
                    predict_row(run, megapixels, max_pixels, Path(tmp) / f"p{n}{max_pixels}"),
                    serve_row(run, megapixels, max_pixels),
                ):
                    rows.append(row)
                    print(row, flush=True)
    command = command_line()
    lines = [
        "# Peak memory of one image, accepted or refused",
        "",
        f"Command: `{command}` (2-core CPU). Default `--max-pixels`: {MAX_PIXELS:,}. Each row is a fresh process;",
        "0 megapixels is its start-up alone (predict: the run's own tiny test split, without overlays).",
        "",
        "| tool | megapixels | --max-pixels | peak RSS (GB) | seconds | outcome |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['tool']} | {r['megapixels']} | {r['max_pixels'] or 'default'} | {r['peak_gb']} | {r['seconds']} | {r['outcome']} |"
        for r in rows
    ]
    write_results(NAME, {"command": command, "max_pixels_default": MAX_PIXELS, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
