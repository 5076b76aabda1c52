"""Export a fitted run as one model: backbone + detector + upsampling + smoothing.

The exported model takes a batch of images already normalised the backbone's way
(RGB, resized to the run's size, scaled to [0, 1], minus ``mean``, divided by ``std``)
and returns the pixel anomaly maps ``(B, H, W)`` and the image scores ``(B,)``. The
preprocessing, the batch size and the decision threshold go in a side JSON beside it.
The batch size is fixed at export (the detectors' chunked loops are traced for it).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import AnomatuneError
from .runs import Run, _atomic_write, load_run

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class ScoringModel(nn.Module):
    """Normalised images → (pixel maps, image scores), exactly as ``predict`` computes them."""

    def __init__(self, run: Run):
        super().__init__()
        self.run = run
        self.extractor = run.extractor.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = x * self.extractor.std + self.extractor.mean  # the extractor normalises [0, 1] images itself
        return self.run.detector.predict(self.extractor(images), self.run.image_size, self.run.config["sigma"])


def preprocessing(run: Run, batch_size: int) -> dict:
    return {"batch_size": batch_size, "size_hw": list(run.image_size), "color": "RGB", "layout": "NCHW float32",
            "scale": "pixel / 255", "mean": run.extractor.mean.flatten().tolist(), "std": run.extractor.std.flatten().tolist()}


def export(run_dir, out=None, format: str = "onnx", batch_size: int = 1) -> Path:
    """Write the run as ``model.onnx`` or ``model.pt`` (TorchScript) plus ``model.json``; return the model path."""
    if format not in FORMATS:
        raise AnomatuneError(f"export format must be one of {', '.join(FORMATS)}, not {format!r}")
    run = load_run(run_dir)
    model = ScoringModel(run).eval()
    out = Path(out) if out else Path(run_dir) / f"model{FORMATS[format]}"
    example = torch.zeros(batch_size, 3, *run.image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks evaluated once
        if format == "onnx":
            _atomic_write(out, lambda tmp: torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=17,
                                                             input_names=["image"], output_names=["maps", "scores"]))
        else:
            traced = torch.jit.trace(model, example, check_trace=False)
            _atomic_write(out, lambda tmp: traced.save(tmp))
    side = {"anomatune_version": run.config["anomatune_version"], "model": out.name, "format": format,
            "input": preprocessing(run, batch_size), "outputs": {"maps": "(B, H, W) pixel anomaly map, higher = more anomalous",
                                                                  "scores": "(B,) image anomaly score"},
            "threshold": (run.config.get("threshold") or {}).get("value"), "detector": run.config["detector"]["name"],
            "backbone": run.config["backbone"], "weights_id": run.config["weights_id"]}
    _atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(side, indent=1) + "\n"))
    return out
