"""The four kinds of folder, each with its own file names.

- a **run** (``anomatune fit``, ``anomatune update``): ``config.yaml``, ``detector.safetensors``,
  ``projection.safetensors``, ``calibration.json``, ``lineage.json`` after an update; then
  ``evaluation/``, ``report.html`` and exported models (operator feedback lies beside it,
  see ``feedback``);
- its **evaluation** (``anomatune evaluate``): metrics, curves, heatmaps, the gallery;
- a **fine-tuning** (``anomatune finetune``): ``checkpoint.pt`` while it trains, then
  ``backbone.safetensors``, ``finetune.yaml``, ``diagnostics.json`` and figures;
- **predictions** (``anomatune predict --out``): ``results.csv`` (``results.parquet/``
  with ``--engine ray``), ``overlays/``, ``masks/``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..errors import RunFolderError
from .base import Folder

log = logging.getLogger(__name__)


class EvaluationFolder(Folder):
    """A run's ``evaluation/``: written as one set by ``anomatune evaluate``."""

    KIND, COMMAND = "evaluation", "anomatune evaluate"
    METRICS = "metrics.json"
    METRICS_TABLE = "metrics.md"
    ROC = "roc.png"
    PRO = "pro.png"
    HEATMAPS = "heatmaps.png"
    GALLERY = "gallery"
    GALLERY_INDEX = "gallery.json"
    IMAGES = "images.json"  # every test image: path, ground truth, score, calibrated scores, verdict
    MARKERS = (METRICS,)


class RunFolder(Folder):
    """A fitted pipeline; its model id is the folder's name and its files' hash."""

    KIND, COMMAND = "run", "anomatune fit"
    CONFIG = "config.yaml"
    DETECTOR = "detector.safetensors"
    PROJECTION = "projection.safetensors"
    SELECTION = "selection.json"  # --detector auto: the candidates' validation table
    CALIBRATION = "calibration.json"  # the held-out good images and their scores: the threshold's and drift's reference
    LINEAGE = "lineage.json"  # anomatune update: the parent version, the images added, both versions' metrics
    EVALUATION = "evaluation"
    REPORT = "report.html"
    MODELS = {"onnx": "model.onnx", "torchscript": "model.pt", "openvino": "model.xml"}
    MARKERS = (CONFIG,)

    @property
    def evaluation(self) -> EvaluationFolder:
        return EvaluationFolder(self.path / self.EVALUATION)

    def fingerprint(self) -> str:
        """``<folder name>@<12 hex digits>``: the SHA-256 of the run's files, the model id in predictions and logs."""
        digest = hashlib.sha256()
        for name in (self.CONFIG, self.DETECTOR, self.PROJECTION):
            path = self.path / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        return f"{self.path.resolve().name}@{digest.hexdigest()[:12]}"

    def stamp(self) -> tuple:
        """Size and modification time of the run's files and of its metrics: changes when the run is refit or
        evaluated again (cheap, unlike :meth:`fingerprint`)."""
        files = (self.CONFIG, self.DETECTOR, self.PROJECTION, self.LINEAGE, f"{self.EVALUATION}/{EvaluationFolder.METRICS}")
        stats = [(self.path / name).stat() if (self.path / name).is_file() else None for name in files]
        return tuple(None if s is None else (s.st_size, s.st_mtime_ns) for s in stats)

    @staticmethod
    def openvino_weights(xml: Path) -> Path:
        """The weights file beside an OpenVINO graph (OpenVINO finds it by this name)."""
        return xml.with_suffix(".bin")


class FinetuneFolder(Folder):
    """A fine-tuning: its checkpoint while it trains, then the backbone to fit on and the diagnostics."""

    KIND, COMMAND = "finetune", "anomatune finetune"
    RECORD = "finetune.yaml"
    CHECKPOINT = "checkpoint.pt"
    BACKBONE = "backbone.safetensors"  # the checkpoint the fine-tuning kept (the frozen backbone after a fallback)
    LAST_BACKBONE = "backbone_last.safetensors"  # the last step's, whatever the validation said
    DIAGNOSTICS = "diagnostics.json"
    WEIGHTS_FIGURE = "finetune_weights.png"
    LOSS_FIGURE = "finetune_loss.png"
    DRY_RUN = "dry_run.json"
    DRY_RUN_FIGURE = "dry_run_weights.png"
    MARKERS = (RECORD, CHECKPOINT, DRY_RUN)
    NOTE = "anomatune_note"  # a line the fine-tuning leaves in its backbone file's metadata, logged when it is used

    def backbone_file(self) -> Path:
        """The backbone of a finished fine-tuning; the note the fine-tuning left in it is logged."""
        from safetensors import safe_open

        self.require()
        path = self.path / self.BACKBONE
        if not path.is_file():
            raise RunFolderError(f"{self.path} holds no {self.BACKBONE}: the fine-tuning did not finish; resume it with --resume")
        with safe_open(str(path), "pt") as weights:
            note = (weights.metadata() or {}).get(self.NOTE)
        if note:
            log.warning("%s: %s", self.path, note)
        return path


class PredictionsFolder(Folder):
    """What ``anomatune predict`` wrote: the results table, overlays and masks."""

    KIND, COMMAND = "predictions", "anomatune predict"
    RESULTS = "results.csv"
    RESULTS_PARQUET = "results.parquet"  # a folder of Parquet files (predict --engine ray)
    OVERLAYS = "overlays"
    MASKS = "masks"
    MARKERS = (RESULTS, RESULTS_PARQUET)
