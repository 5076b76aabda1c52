"""What a user waits for: whole commands of anomatune against anomalib 2.7, timed side by side.

Each job is a fresh process (start-up, imports, data, fit, test, figures, everything),
run one after the other on the same thread count, timed from outside with its peak
memory. anomalib runs in its own virtual environment (``benchmarks/.peer/venv``, git-
ignored, built here on first use from the package registry; never a project
dependency) through ``benchmarks/peer_anomalib.py``, with the same Lite0 weights (written
by anomatune in timm's key names), the same feature stages and, for PaDiM, every feature
kept. Both resize to 256 x 256.

    python benchmarks/vs_anomalib.py                          # transistor and loco_juice_bottle_logical
    python benchmarks/vs_anomalib.py --datasets transistor --jobs padim

Writes ``results/vs_anomalib.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anomatune.folders.kinds import ModelFolder
from common import SQUARE, dataset, write_results

HERE = Path(__file__).parent
PEER = HERE / ".peer"
PEER_PYTHON = PEER / "venv" / "bin" / "python"
PEER_PACKAGES = ["anomalib==2.7.0"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # the project's pins: both sides run the same torch
LAYERS = {"timm": "blocks.2,blocks.4", "anomatune": "2,3"}  # Lite0's stride-8 and stride-16 stages, anomatune's default
CORESET = 0.01
# job -> (anomalib model or None, anomatune detector, anomatune --set)
JOBS = {
    "padim": ("padim", "padim", []),
    "patchcore": ("patchcore", "patchcore", [f"coreset_ratio={CORESET}"]),
    "default": (None, "glad", []),
}


def ensure_peer() -> None:
    """anomalib 2.7 in its own venv, torch pinned like the project's (installed once)."""
    if PEER_PYTHON.exists() and subprocess.run([PEER_PYTHON, "-c", "import anomalib"], capture_output=True).returncode == 0:
        return
    print("installing anomalib 2.7 into benchmarks/.peer/venv (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", PEER / "venv"], check=True)
    pip = [PEER_PYTHON, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + TORCH, check=True)
    constraints = PEER / "constraints.txt"
    constraints.write_text("\n".join(TORCH) + "\n")
    subprocess.run(pip + ["-c", constraints] + PEER_PACKAGES, check=True)


def write_weights() -> tuple[Path, int]:
    """Lite0's packaged weights in timm's key names, for anomalib's timm feature extractor, and the features' dimension."""
    import torch

    from anomatune.features.backbones import create_backbone
    from anomatune.features.extractor import FeatureExtractor

    path = PEER / "efficientnet_lite0_timm.pt"
    if not path.exists():
        torch.save(create_backbone("efficientnet_lite0").model.state_dict(), path)
    return path, FeatureExtractor("efficientnet_lite0").raw_dim


def timed(command: list, env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak memory (GB) and stdout of one whole process."""
    with tempfile.NamedTemporaryFile(suffix=".time") as peak:
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-q", "-f", "%M", "-o", peak.name, *map(str, command)], env=env, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
        return seconds, int(Path(peak.name).read_text().split()[-1]) / 1e6, done.stdout


def anomatune_job(name: str, root: Path, category: str, work: Path, env: dict, one_process: bool) -> dict:
    _, detector, sets = JOBS[name]
    cli = [Path(sys.executable).parent / "anomatune"]
    out = work / f"{category}-{name}-{'one' if one_process else 'two'}"
    fit = cli + ["fit", "--data", root, "--category", category, "--detector", detector, "--image-size", SQUARE, "--out", out]
    fit += [a for s in sets for a in ("--set", s)]
    if one_process:
        seconds, peak, _ = timed(fit + ["--evaluate"], env)
    else:
        fit_s, fit_peak, _ = timed(fit, env)
        eval_s, eval_peak, _ = timed(cli + ["evaluate", out], env)
        seconds, peak = fit_s + eval_s, max(fit_peak, eval_peak)
    metrics = json.loads((ModelFolder(out).version().evaluation / "metrics.json").read_text())
    return {
        "tool": "anomatune",
        "how": "fit --evaluate" if one_process else "fit, then evaluate",
        "seconds": round(seconds, 1),
        "peak_gb": round(peak, 2),
        **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
    }


def anomalib_job(name: str, root: Path, category: str, work: Path, env: dict, threads: int, weights: tuple[Path, int]) -> dict:
    model = JOBS[name][0]
    command = [
        PEER_PYTHON,
        HERE / "peer_anomalib.py",
        "--root",
        root,
        "--category",
        category,
        "--model",
        model,
        "--weights",
        weights[0],
        "--n-features",
        weights[1],
        "--layers",
        LAYERS["timm"],
        "--out",
        work / f"anomalib-{category}-{name}",
        "--threads",
        threads,
    ]
    seconds, peak, stdout = timed(command, env)
    metrics = json.loads(stdout.strip().splitlines()[-1])
    return {
        "tool": "anomalib 2.7",
        "how": "Engine.fit, Engine.test",
        "seconds": round(seconds, 1),
        "peak_gb": round(peak, 2),
        "image_auroc": round(metrics["image_AUROC"], 4),
        "pixel_auroc": round(metrics["pixel_AUROC"], 4) if "pixel_AUROC" in metrics else None,
        "aupro": None,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| category | job | tool | how | wall s | ratio to anomalib | peak GB | image AUROC | pixel AUROC | AUPRO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['category']} | {r['job']} | {r['tool']} | {r['how']} | {r['seconds']} | {ratio} | {r['peak_gb']} | "
            f"{r['image_auroc']} | {r['pixel_auroc']} | {'–' if r['aupro'] is None else r['aupro']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["transistor", "loco_juice_bottle_logical"])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="Threads of every process (OMP_NUM_THREADS).")
    parser.add_argument("--name", default="vs_anomalib")
    args = parser.parse_args()
    ensure_peer()
    weights = write_weights()
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.datasets:
            root, category = dataset(name)
            peers = {}  # anomalib's run of each model; the default detector is held against its PaDiM
            for job in args.jobs:
                runs = [anomatune_job(job, root, category, work, env, one) for one in (False, True)]
                if JOBS[job][0]:
                    peers[job] = anomalib_job(job, root, category, work, env, args.threads, weights)
                    runs.insert(0, peers[job])
                reference = peers.get(JOBS[job][0] or "padim")
                for run in runs:
                    run |= {"category": name, "job": job, "ratio": run["seconds"] / reference["seconds"] if reference else None}
                    rows.append(run)
                    print(table([run]).splitlines()[-1], flush=True)
    setup = {
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "input": SQUARE,
        "coreset_ratio": CORESET,
        "layers": LAYERS,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_results(
        args.name,
        {"setup": setup, "rows": rows},
        f"# {args.name}\n\nWhole-process wall time, sequential, {args.threads} threads on {os.cpu_count()} cores, {SQUARE} "
        f"input, `python benchmarks/vs_anomalib.py {' '.join(sys.argv[1:])}`.\n\n" + table(rows),
    )


if __name__ == "__main__":
    main()
