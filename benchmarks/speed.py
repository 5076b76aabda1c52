"""Feature extraction on the CPU, step by step: what each change buys, in images per second.

Lite0 at 256 x 256 (stages 2 and 3) on transistor's 213 training images. Each step runs
in a fresh process (the allocator is a per-process setting) and reports two rates: the
backbone's forward on images already in memory, and reading + decoding + resizing +
forward as ``fit`` does it. Steps, each on top of the one before unless said:

1. glibc's defaults, contiguous tensors, batch 8;
2. the allocator tuned (``anomatune.allocator``: no mmap, no trim), as every command does;
3. ``channels_last`` (what ``FeatureExtractor`` does for CNNs);
4. batch 32 instead of 8;
5. one image-decoding worker process (batch 8);
6. the frozen backbone in ONNX Runtime (batch 8, its own thread pool), instead of torch.

    python benchmarks/speed.py

Writes ``results/speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import SQUARE, dataset, write_results

STEPS = {
    "glibc defaults, contiguous, batch 8": {
        "allocator": False,
        "channels_last": False,
        "batch": 8,
        "workers": 0,
        "runtime": "torch",
    },
    "+ allocator tuned": {"allocator": True, "channels_last": False, "batch": 8, "workers": 0, "runtime": "torch"},
    "+ channels_last": {"allocator": True, "channels_last": True, "batch": 8, "workers": 0, "runtime": "torch"},
    "batch 32": {"allocator": True, "channels_last": True, "batch": 32, "workers": 0, "runtime": "torch"},
    "1 decoding worker, batch 8": {"allocator": True, "channels_last": True, "batch": 8, "workers": 1, "runtime": "torch"},
    "ONNX Runtime backbone, batch 8": {"allocator": True, "channels_last": False, "batch": 8, "workers": 0, "runtime": "onnx"},
}
REPEATS = 3  # the forward-only rate is the best of these passes over the images


def measure(step: dict) -> dict:
    """Images/s of the forward alone and of loading + forward, in this process, as ``step`` says."""
    from anomatune.allocator import tune_allocator

    if step["allocator"]:
        tune_allocator()
    import torch
    from torch.utils.data import DataLoader

    from anomatune.data import MVTecAD, collate
    from anomatune.features import FeatureExtractor

    root, category = dataset("transistor")
    train = MVTecAD(root, category, "train", image_size=SQUARE)
    extractor = FeatureExtractor("efficientnet_lite0").eval()
    layout = torch.channels_last if step["channels_last"] else torch.contiguous_format
    model = extractor.model.to(memory_format=layout)
    layers = list(extractor.layers)

    def normalised(images: torch.Tensor) -> torch.Tensor:
        return ((images - extractor.mean) / extractor.std).contiguous(memory_format=layout)

    if step["runtime"] == "onnx":
        forward = onnx_forward(model, layers, step["batch"])
    else:

        def forward(x: torch.Tensor):
            with torch.inference_mode():
                return model.forward_intermediates(x, indices=layers, intermediates_only=True)

    loader = DataLoader(train, batch_size=step["batch"], collate_fn=collate, num_workers=step["workers"])
    images = torch.cat([b["image"] for b in DataLoader(train, batch_size=32, collate_fn=collate)])
    batches = [normalised(chunk) for chunk in torch.split(images, step["batch"])]
    forward(batches[0])  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for x in batches:
            forward(x)
        best = min(best, time.perf_counter() - start)
    start = time.perf_counter()
    for batch in loader:
        forward(normalised(batch["image"]))
    loaded = time.perf_counter() - start
    return {"forward_images_per_s": round(len(images) / best, 1), "load_and_forward_images_per_s": round(len(images) / loaded, 1)}


def onnx_forward(model, layers: list[int], batch: int):
    """The backbone's stage maps exported to ONNX (fixed batch), run by ONNX Runtime on the CPU."""
    import numpy as np
    import onnxruntime
    import torch

    class Stages(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return tuple(self.model.forward_intermediates(x, indices=layers, intermediates_only=True))

    path = os.path.join(tempfile.mkdtemp(), "stages.onnx")
    torch.onnx.export(Stages().eval(), (torch.zeros(batch, 3, 256, 256),), path, dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor):
        array = np.ascontiguousarray(x.numpy())
        if len(array) < batch:  # the last, short batch: padded to the exported size
            array = np.concatenate([array, np.zeros((batch - len(array), *array.shape[1:]), array.dtype)])
        return session.run(None, {name: array})

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # the child process of one step
    args = parser.parse_args()
    if args.step:
        print(json.dumps(measure(STEPS[args.step])))
        return
    dataset("transistor")
    rows = []
    for name, step in STEPS.items():
        done = subprocess.run(
            [sys.executable, __file__, "--step", name],
            env=os.environ | {"TQDM_DISABLE": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append({"step": name, **step, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    table = [f"| {r['step']} | {r['forward_images_per_s']} | {r['load_and_forward_images_per_s']} |" for r in rows]
    write_results(
        "speed",
        {"threads": os.cpu_count(), "rows": rows},
        f"# Feature extraction on the CPU, step by step\n\n`python benchmarks/speed.py`: Lite0, {SQUARE}, transistor's "
        f"213 training images, {os.cpu_count()} cores, each step in a fresh process. Forward: best of {REPEATS} passes over "
        "images in memory; load + forward: reading, decoding, resizing and forward, as `fit` does.\n\n"
        "| step | forward images/s | load + forward images/s |\n|---|---|---|\n" + "\n".join(table) + "\n",
    )


if __name__ == "__main__":
    main()
