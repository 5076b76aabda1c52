"""The kinds of folder, each with its own file names.

- a **model** (``anomatune fit --out``): its versions, ``versions/v1``, ``v2``, ..., each a run,
  ``aliases.json`` naming the version in service, and the operator's ``feedback/``;
- a **run**, one version of a model (``fit``, ``update``, ``threshold``): ``config.yaml``,
  ``detector.safetensors``, ``projection.safetensors``, ``calibration.json``, ``version.json``,
  ``lineage.json`` after an update: written once, never changed; then what is made from it,
  ``evaluation/``, ``report.html`` and exported models;
- its **evaluation** (``anomatune evaluate``): metrics, curves, heatmaps, the gallery;
- a **fine-tuning** (``anomatune finetune``): ``checkpoint.pt`` while it trains, then
  ``backbone.safetensors``, ``finetune.yaml``, ``diagnostics.json`` and figures;
- **predictions** (``anomatune predict --out``): ``results.csv`` (``results.parquet/``
  with ``--engine ray``), ``overlays/``, ``masks/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import RunFolderError
from .base import Folder, usual_mode

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
    """One version of a model: a fitted pipeline, whose model files never change once written."""

    KIND, COMMAND = "run", "anomatune fit"
    CONFIG = "config.yaml"
    DETECTOR = "detector.safetensors"
    PROJECTION = "projection.safetensors"
    POSTPROCESS = "postprocess.safetensors"  # the maps' per-pixel standardisation (postprocess.standardize)
    SELECTION = "selection.json"  # --detector auto: the candidates' validation table
    CALIBRATION = "calibration.json"  # the good images' out-of-fold scores: the threshold's and drift's reference
    LINEAGE = "lineage.json"  # anomatune update: the parent version, the images added, both versions' metrics
    VERSION = "version.json"  # the version's name, id (digest), parent, time and the command that wrote it
    EVALUATION = "evaluation"
    REPORT = "report.html"
    MODELS = {"onnx": "model.onnx", "torchscript": "model.pt", "openvino": "model.xml"}
    MARKERS = (CONFIG,)
    DETERMINING = (CONFIG, DETECTOR, PROJECTION, POSTPROCESS, CALIBRATION)  # the files a version's id is the digest of

    @property
    def evaluation(self) -> EvaluationFolder:
        return EvaluationFolder(self.path / self.EVALUATION)

    @property
    def is_version(self) -> bool:
        """Whether this run is a version of a model (``MODEL/versions/vN``)."""
        return self.path.resolve().parent.name == ModelFolder.VERSIONS

    @property
    def model_path(self) -> Path:
        """The model's folder for a version, else this folder."""
        path = self.path.resolve()
        return path.parent.parent if self.is_version else path

    @property
    def model_name(self) -> str:
        return self.model_path.name

    def digest(self) -> str:
        """12 hex digits of the SHA-256 of what determines the version's outputs (settings, tensors, calibration;
        never a time or a place): two identical fits have the same digest."""
        digest = hashlib.sha256()
        for name in self.DETERMINING:
            path = self.path / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:12]

    def fingerprint(self) -> str:
        """``<model name>@<digest>``: the model id in predictions, logs and ``/models``."""
        return f"{self.model_name}@{self.digest()}"

    def verified(self) -> str:
        """The fingerprint, checked against the digest recorded when the version was written: a version whose model
        files were changed since is refused rather than served with the old id."""
        fingerprint = self.fingerprint()
        if (self.path / self.VERSION).is_file():
            recorded = self.read_json(self.VERSION).get("digest")
            if recorded != fingerprint.rpartition("@")[2]:
                raise RunFolderError(
                    f"{self.path}: its model files changed after the version was written (digest {recorded}, now "
                    f"{fingerprint.rpartition('@')[2]}): serve another version ('anomatune promote') or refit"
                )
        return fingerprint

    def stamp(self) -> tuple:
        """Size and modification time of the run's files and of its metrics: changes when the run is evaluated again
        (cheap, unlike :meth:`digest`)."""
        files = (*self.DETERMINING, self.LINEAGE, f"{self.EVALUATION}/{EvaluationFolder.METRICS}")
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


_VERSION_NAME = re.compile(r"v(\d+)")
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


class ModelFolder(Folder):
    """A model: its versions, each a :class:`RunFolder` written once under ``versions/``, and the alias of the one in
    service (``aliases.json``), the pattern of a model registry.

    A fit, an update or a new threshold adds a version beside the others (:meth:`add`); :meth:`promote` moves the
    alias (a rollback is one promote); :meth:`remove` deletes old versions, never the served one. Every step is one
    rename or one atomic write, so a ``kill -9`` at any point leaves every earlier version whole and the alias on a
    complete version. A version's model files are made read-only, and those equal to its parent's are hard links to
    them (stored once).
    """

    KIND, COMMAND = "model", "anomatune fit"
    VERSIONS = "versions"
    ALIASES = "aliases.json"
    SERVED = "served"  # the alias of the version in service
    FEEDBACK = "feedback"  # the operator's verdicts (see feedback.FeedbackStore), shared by the versions
    MARKERS = (ALIASES, VERSIONS)

    def versions(self) -> list[str]:
        """The complete versions, oldest first (``v1``, ``v2``, ...)."""
        folder = self.path / self.VERSIONS
        found = [p.name for p in folder.iterdir() if _VERSION_NAME.fullmatch(p.name)] if folder.is_dir() else []
        return sorted(found, key=lambda name: int(name[1:]))

    def aliases(self) -> dict[str, str]:
        return self.read_json(self.ALIASES) if (self.path / self.ALIASES).is_file() else {}

    def served_name(self) -> str:
        name = self.aliases().get(self.SERVED)
        if name is None:
            raise RunFolderError(f"{self.path / self.ALIASES} names no served version: 'anomatune promote {self.path} vN'")
        return name

    def version(self, name: str | None = None) -> RunFolder:
        """A version by name (``v3``, or ``3``), or by id digest; ``None``: the served one."""
        name = self.served_name() if name is None else str(name)
        name = f"v{name}" if name.isdigit() else name
        known = self.versions()
        if name not in known:
            matches = [v for v in known if RunFolder(self.path / self.VERSIONS / v).digest() == name.rpartition("@")[2]]
            if len(matches) != 1:
                raise RunFolderError(f"{self.path} has no version {name!r}: its versions are {', '.join(known) or 'none'}")
            name = matches[0]
        return RunFolder(self.path / self.VERSIONS / name)

    def stamp(self) -> tuple:
        """Changes when the alias moves or the served version is evaluated again (for ``serve --watch``)."""
        aliases = self.path / self.ALIASES
        moved = aliases.read_bytes() if aliases.is_file() else b""
        try:
            return (moved, self.version().stamp())
        except RunFolderError:
            return (moved,)

    def check_place(self) -> None:
        """One line when this folder would lie inside another model or run (a later removal would take it away)."""
        for parent in self.path.expanduser().resolve().parents:
            kind = Folder(parent).kind
            if kind in (self.KIND, RunFolder.KIND):
                raise RunFolderError(f"{self.path} lies inside the {kind} {parent}: choose a folder outside it")

    def add(self, write: Callable[[RunFolder], None], *, parent: str | None = None, command: str = "fit",
            promote: bool = True) -> tuple[RunFolder, bool]:  # fmt: skip
        """Write a new version with ``write(stage)`` and return it, with whether it is new: a version identical to an
        existing one (same digest) is not written twice, that one is returned (and promoted when asked)."""
        self.check_place()
        with self.claim():
            folder = self.path / self.VERSIONS
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*"):  # a version being written or removed by a killed command
                shutil.rmtree(stale, ignore_errors=True)
            stage = RunFolder(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            try:
                write(stage)
                digest = stage.digest()
                same = [v for v in self.versions() if RunFolder(folder / v).digest() == digest]
                if same:
                    version, new = RunFolder(folder / same[-1]), False
                    log.info("%s: identical to version %s (%s): no new version", self.path, same[-1], digest)
                else:
                    name = f"v{max((int(v[1:]) for v in self.versions()), default=0) + 1}"
                    record = {"version": name, "digest": digest, "parent": parent, "command": command,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
                    stage.write_json(RunFolder.VERSION, record)
                    self._seal(stage, RunFolder(folder / parent) if parent in self.versions() else None)
                    usual_mode(str(stage.path), directory=True)
                    os.replace(stage.path, folder / name)
                    version, new = RunFolder(folder / name), True
            finally:
                shutil.rmtree(stage.path, ignore_errors=True)
            if promote or not self.aliases():
                self._set_alias(version.path.name)
            return version, new

    @staticmethod
    def _seal(stage: RunFolder, parent: RunFolder | None) -> None:
        """Make the model files read-only; those equal to the parent's become hard links to them."""
        for name in (*RunFolder.DETERMINING, RunFolder.SELECTION, RunFolder.LINEAGE, RunFolder.VERSION):
            path = stage / name
            if not path.is_file():
                continue
            same = parent / name if parent is not None else None
            if same is not None and same.is_file() and same.stat().st_size == path.stat().st_size:
                if same.read_bytes() == path.read_bytes():
                    try:
                        os.link(same, path.with_name(f".{name}.link"))
                        os.replace(path.with_name(f".{name}.link"), path)
                        continue
                    except OSError:  # no hard links on this file system: a copy
                        pass
            path.chmod(READ_ONLY)

    def promote(self, name: str) -> RunFolder:
        """Serve version ``name`` (a rollback is a promote of an older one)."""
        with self.lock():
            version = self.version(name)
            version.require()
            self._set_alias(version.path.name)
            return version

    def _set_alias(self, name: str) -> None:
        self.write_json(self.ALIASES, {**self.aliases(), self.SERVED: name})
        log.debug("%s: serving version %s", self.path, name)

    def remove(self, keep: int) -> list[str]:
        """Remove all but the last ``keep`` versions, never the served one; each goes by one rename, then deletion."""
        with self.lock():
            served = self.served_name()
            versions = self.versions()
            doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != served]
            for name in doomed:
                trash = self.path / self.VERSIONS / f".removed-{name}-{uuid.uuid4().hex[:8]}"
                os.replace(self.path / self.VERSIONS / name, trash)
                shutil.rmtree(trash, ignore_errors=True)
            return doomed


def folder_stamp(path: str | Path) -> tuple:
    """What changes when a model's served version changes or is evaluated again (a version folder: its files)."""
    return ModelFolder(path).stamp() if Folder(path).kind == ModelFolder.KIND else RunFolder(path).stamp()


def open_run(path: str | Path, version: str | None = None) -> RunFolder:
    """The run a command reads: a model's served version (or ``version``), or a version's own folder."""
    folder = Folder(path)
    if folder.kind == ModelFolder.KIND:
        return ModelFolder(path).version(version).require()
    if version is not None:
        raise RunFolderError(f"{path} is not a model folder: pass the model's folder with a version")
    return RunFolder(path).require()
