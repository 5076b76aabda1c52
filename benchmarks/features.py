"""Feature-extraction speed and peak memory per backbone (256 px, batch 8).

Each backbone runs in a fresh process so its peak resident memory is its own.
Writes ``benchmarks/results/features.json`` and ``features.md``.

    python benchmarks/features.py                   # CPU, torch threads 1 and 2
    python benchmarks/features.py --device cuda     # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

from common import RESULTS, command_line


def measure(backbone: str, device: str, threads: int, batch: int, size: int, batches: int) -> dict:
    import torch

    from anomatune.features import FeatureExtractor

    torch.set_num_threads(threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    extractor = FeatureExtractor(backbone).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device)
    with torch.inference_mode():
        extractor(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(batches):
            out = extractor(x)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result = {
        "backbone": backbone,
        "device": device,
        "threads": threads,
        "images_per_s": round(batch * batches / seconds, 1),
        "feature_shape": list(out.shape[1:]),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_before_model_mib": round(rss_start),
    }
    if device == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "dinov2_vits14"]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.backbones[0], args.device, args.threads[0], args.batch, args.size, args.batches)))
        return
    rows = []
    for backbone in args.backbones:
        for threads in args.threads:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--backbones",
                backbone,
                "--device",
                args.device,
                "--threads",
                str(threads),
                "--batch",
                str(args.batch),
                "--size",
                str(args.size),
                "--batches",
                str(args.batches),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    command = command_line()
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    meta = {
        "command": command.strip(),
        "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "batch": args.batch,
        "size": args.size,
    }
    (RESULTS / f"features{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Feature extraction speed ({args.size} px, batch {args.batch}, device {args.device})",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}.",
        "",
        "| backbone | threads | images/s | features (D, h, w) | peak RSS MiB | RSS before model MiB |"
        + (" peak CUDA MiB |" if args.device == "cuda" else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['threads']} | {r['images_per_s']} | {tuple(r['feature_shape'])} | {r['peak_rss_mib']} | {r['rss_before_model_mib']} |"
            + (f" {r['peak_cuda_mib']} |" if args.device == "cuda" else "")
        )
    (RESULTS / f"features{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
