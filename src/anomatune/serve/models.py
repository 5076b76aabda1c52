"""A run as the server holds it: its pipeline, the engine that computes its maps, what /models says of it.

Every engine computes the pipeline's own ``forward`` (images in [0, 1] at the input size →
pixel maps and image scores): eager torch, or the run exported at start-up (any batch size)
and run by ONNX Runtime or OpenVINO. Decisions, masks and overlays are then the
pipeline's, whatever the engine.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import AnomatuneError
from ..folders.base import PNG_COMPRESSION
from ..folders.kinds import EvaluationFolder, RunFolder, folder_stamp, open_run
from ..inference.predict import draw
from ..metrics import MAIN_METRICS
from ..pipeline.pipeline import Pipeline

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
    return buffer.getvalue()


def exported_forward(pipeline: Pipeline, run_dir: Path, runtime: str, folder: Path) -> Forward:
    """The run exported into ``folder`` and run by ONNX Runtime or OpenVINO, as a forward of [0, 1] images."""
    from ..inference.export import export

    model = export(run_dir, folder / RunFolder.MODELS["onnx" if runtime == "onnx" else "openvino"], format=runtime)
    mean, std = pipeline.extractor_.mean.cpu(), pipeline.extractor_.std.cpu()
    if runtime == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])

        def run(x: np.ndarray):
            return session.run(None, {"image": x})
    else:
        import openvino

        compiled = openvino.Core().compile_model(
            str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )  # not bf16: scores need f32

        def run(x: np.ndarray):
            answer = compiled(x)
            return answer[compiled.output("maps")], answer[compiled.output("scores")]

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = run(((images - mean) / std).numpy())
        return torch.from_numpy(np.asarray(maps)), torch.from_numpy(np.asarray(scores))

    return forward


@dataclass
class ServedModel:
    """A model's served version, loaded: ``id`` is the model's name and the version's digest (the model id of
    predictions). It never reads its files again: a later change on disk cannot alter what it answers."""

    run_dir: Path
    pipeline: Pipeline
    forward: Forward
    runtime: str
    stamp: tuple = ()  # the run's files when it was loaded (see RunFolder.stamp)
    metrics: dict | None = None  # its evaluation's metrics when it was loaded
    options: dict = field(default_factory=dict)  # how it was loaded (device, max_batch, limits): a reload loads alike
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False)  # the exported model, removed with the object

    @classmethod
    def load(cls, run_dir: str | Path, runtime: str = "torch", device: str = "auto", max_batch: int = 8, **limits) -> ServedModel:
        """The run at ``run_dir`` on ``runtime``; one forward pass takes up to ``max_batch`` images; ``limits``:
        ``max_pixels`` (see :class:`RuntimeSettings`)."""
        run_dir = Path(run_dir)
        stamp = folder_stamp(run_dir)  # before the load: a change during it shows as stale
        version = open_run(run_dir)  # the served version, whatever the alias says later
        pipeline = Pipeline.load(version.path, device=device if runtime == "torch" else "cpu", batch_size=max_batch, **limits)
        if pipeline.threshold is None or pipeline.image_calibration is None:
            raise AnomatuneError(f"{run_dir} learnt no threshold (fitted with --threshold-folds 0): refit it to serve decisions")
        options = {"device": device, "max_batch": max_batch, **limits}
        snapshot = {"stamp": stamp, "metrics": read_metrics(version), "options": options}
        if runtime == "torch":
            return cls(run_dir, pipeline, pipeline.forward, runtime, **snapshot)
        folder = tempfile.TemporaryDirectory(prefix="anomatune-serve-")
        try:
            forward = exported_forward(pipeline, version.path, runtime, Path(folder.name))
        except ImportError as exc:
            folder.cleanup()
            raise AnomatuneError(
                f"--runtime {runtime} needs {exc.name}: pip install 'anomatune[{'export' if runtime == 'onnx' else 'openvino'}]'"
            ) from None
        log.info("%s exported for %s", run_dir, runtime)
        return cls(run_dir, pipeline, forward, runtime, **snapshot, _folder=folder)

    @property
    def id(self) -> str:
        return self.pipeline.model_id_

    @property
    def name(self) -> str:
        """The run folder's name (as ``serve .`` resolves it): ``model=NAME`` and ``/models/NAME/reload``."""
        return self.run_dir.resolve().name

    @property
    def threshold(self) -> float:
        return self.pipeline.threshold

    @property
    def false_alarm_rate(self) -> dict:
        """The false-alarm rate asked, the one expected at the threshold and its 95 % interval."""
        calibration = self.pipeline.image_calibration
        return {
            "target": calibration.target_rate,
            "expected": calibration.rate_at_threshold,
            "interval": list(calibration.interval),
        }

    @property
    def calibration_scores(self) -> list[float]:
        """The good images' out-of-fold scores the threshold was learnt on: the drift statistic's reference."""
        return (getattr(self.pipeline, "calibration_", None) or {}).get("scores", [])

    @property
    def parent(self) -> str | None:
        """The model id this version was updated from (``anomatune update``), if any."""
        return (getattr(self.pipeline, "lineage_", None) or {}).get("parent")

    def reloaded(self) -> ServedModel:
        """The run folder's current version, loaded as this one was."""
        return type(self).load(self.run_dir, self.runtime, **self.options)

    @property
    def max_pixels(self) -> int:
        return self.pipeline.runtime.max_pixels

    def info(self) -> dict:
        """What ``GET /models`` says of the model it serves: the run as it was loaded, with its evaluation's metrics
        then; ``stale`` when the run on disk has changed since (refit, updated or evaluated again: reload it)."""
        config = self.pipeline.config()
        return {
            "id": self.id,
            "name": self.name,
            "version": self.pipeline.version_,
            "parent": self.parent,
            "backbone": config.settings.features.backbone,
            "detector": config.settings.detector.name,
            "threshold": self.threshold,
            "false_alarm_rate": self.false_alarm_rate,
            "input_size": list(config.fitted.input_size),
            "anomatune_version": config.anomatune_version,
            "runtime": self.runtime,
            "metrics": self.metrics,
            "stale": folder_stamp(self.run_dir) != self.stamp,
        }

    def score(self, pictures: Sequence[Image.Image], drawn: Sequence[bool] | None = None) -> list[dict]:
        """One forward pass over ``pictures``: per picture its score, decision and, where ``drawn`` says so (default:
        all), its PNG overlay and mask (bytes)."""
        predictions = self.pipeline.predict(pictures, forward=self.forward)
        results = []
        for n, (picture, score, label) in enumerate(zip(pictures, predictions.scores, predictions.labels)):
            result = {
                "score": float(score),
                "normalized_score": float(predictions.normalized[n]),
                "false_alarm_rate": float(predictions.false_alarm_rates[n]),
                "decision": "defective" if label else "good",
            }
            if drawn is None or drawn[n]:
                overlay, mask = draw(
                    self.pipeline, picture, predictions.maps[n], predictions.masks[n], predictions.pixel_threshold
                )
                result |= {"overlay": png_bytes(overlay), "mask": png_bytes(mask)}
            results.append(result)
        return results


def check_run_names(run_dirs: Sequence[str | Path]) -> None:
    """One line when two runs have the same folder name: a request's ``model=NAME`` would be ambiguous."""
    names = [Path(run).resolve().name for run in run_dirs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AnomatuneError(f"several runs are named {', '.join(twice)}: serve runs whose folders have different names")


def read_metrics(run: RunFolder) -> dict | None:
    """The main metrics of the version's evaluation, or None when it was not evaluated."""
    evaluation = run.evaluation
    if not (evaluation / EvaluationFolder.METRICS).is_file():
        return None
    found = evaluation.read_json(EvaluationFolder.METRICS)
    return {k: found.get(k) for k in (*MAIN_METRICS, "category", "n_test")}


def encode(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")
