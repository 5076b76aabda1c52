"""Run folders: the only code that knows their file names and writes into them.

Three kinds of folder, told apart by the file that marks them:

- a **run** (``anomatune fit``): ``config.yaml``, ``detector.safetensors``,
  ``projection.safetensors``; then ``evaluation/`` (``anomatune evaluate``: metrics,
  curves, gallery), ``report.html`` and exported models beside them;
- a **fine-tuning** (``anomatune finetune``): ``checkpoint.pt`` while it trains, then
  ``backbone.safetensors``, ``finetune.yaml``, ``diagnostics.json`` and figures;
- **predictions** (``anomatune predict --out``): ``results.csv`` (``results.parquet/`` with
  ``--engine ray``), ``overlays/``, ``masks/``.

Every file is written atomically (a temporary file in the same folder, then a rename).
A run, an evaluation and a set of predictions are each written as one set: staged in a
hidden folder beside the target, then swapped in, so a refit never leaves the old
metrics or exports beside the new config, a failed command leaves the folder as it was,
and two predictions never mix. A folder of another kind, or one with files anomatune did
not write, is refused rather than replaced. Writers hold a lock file beside the folder:
a second command writing the same folder stops with one line instead of mixing files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from ..errors import RunFolderError
from ..features.settings import RANDOM

try:
    import fcntl
except ImportError:  # not POSIX: no lock (said once when a lock is asked for)
    fcntl = None

log = logging.getLogger(__name__)
PNG_COMPRESSION = 1  # zlib level of every PNG written: 3-4x faster than the default 6, files about a third larger

_HELD: dict[Path, int] = {}  # locks this process holds, by folder: re-entrant within a process


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: str, directory: bool = False) -> None:
    """Temporary files and folders are private (0600/0700); what replaces a user's file gets the usual mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_safe(value: Any) -> Any:
    """NaN and infinities (a metric that does not apply) become ``null``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(data: Any, indent: int | None = 1) -> str:
    """Strict JSON text: NaN (a metric that does not apply) is written as ``null``."""
    return json.dumps(json_safe(data), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"


def _ours(name: str) -> bool:
    """The hidden lock, staging and swap files anomatune leaves beside the folders it writes."""
    return name.startswith(".") and (name.endswith(".lock") or ".staging-" in name or ".old-" in name)


class RunFolder:
    """A run, fine-tuning or predictions folder: its file names, atomic writes, staging and lock."""

    # a fitted pipeline
    CONFIG = "config.yaml"
    DETECTOR = "detector.safetensors"
    PROJECTION = "projection.safetensors"
    EVALUATION = "evaluation"
    REPORT = "report.html"
    MODELS = {"onnx": "model.onnx", "torchscript": "model.pt", "openvino": "model.xml"}  # OpenVINO's weights: model.bin beside
    # an evaluation (the run's evaluation/ folder)
    METRICS = "metrics.json"
    METRICS_TABLE = "metrics.md"
    ROC = "roc.png"
    PRO = "pro.png"
    HEATMAPS = "heatmaps.png"
    GALLERY = "gallery"
    GALLERY_INDEX = "gallery.json"
    # a fine-tuning
    FINETUNE = "finetune.yaml"
    CHECKPOINT = "checkpoint.pt"
    BACKBONE = "backbone.safetensors"  # the best checkpoint on validation (the frozen backbone after a fallback)
    LAST_BACKBONE = "backbone_last.safetensors"  # the last step's, whatever the validation said
    DIAGNOSTICS = "diagnostics.json"
    WEIGHTS_FIGURE = "finetune_weights.png"
    LOSS_FIGURE = "finetune_loss.png"
    DRY_RUN = "dry_run.json"
    DRY_RUN_FIGURE = "dry_run_weights.png"
    # predictions
    RESULTS = "results.csv"
    RESULTS_PARQUET = "results.parquet"  # a folder of Parquet files (predict --engine ray)
    OVERLAYS = "overlays"
    MASKS = "masks"

    KINDS = {"run": (CONFIG,), "finetune": (FINETUNE, CHECKPOINT, DRY_RUN), "evaluation": (METRICS,), "predictions": (RESULTS, RESULTS_PARQUET)}
    COMMANDS = {"run": "anomatune fit", "finetune": "anomatune finetune", "evaluation": "anomatune evaluate",
                "predictions": "anomatune predict"}

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def evaluation(self) -> "RunFolder":
        return RunFolder(self.path / self.EVALUATION)

    @property
    def kind(self) -> str | None:
        """``run``, ``finetune``, ``evaluation``, ``predictions``; ``None`` when absent or empty; ``foreign`` otherwise."""
        if not self.path.is_dir():
            if self.path.exists():
                return "foreign"
            return None
        for kind, markers in self.KINDS.items():
            if any((self.path / m).exists() for m in markers):
                return kind
        return "foreign" if any(not _ours(p.name) for p in self.path.iterdir()) else None

    def require(self, kind: str) -> "RunFolder":
        """This folder, if it is of ``kind``; otherwise one line saying what it is and what to pass."""
        found = self.kind
        if found != kind:
            what = "does not exist" if found is None and not self.path.exists() else (
                "is empty" if found is None else "is not an anomatune folder" if found == "foreign" else f"holds a {found}")
            raise RunFolderError(f"{self.path} {what}: pass a folder written by '{self.COMMANDS[kind]}'")
        return self

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock (a file beside it) while writing; re-entrant within this process."""
        key = self.path.resolve()
        if _HELD.get(key) or fcntl is None:
            if fcntl is None:
                log.warning("no file locks on this platform: do not run two commands on %s at once", self.path)
            _HELD[key] = _HELD.get(key, 0) + 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.parent / f".{self.path.name}.lock"
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(f"{self.path} is being written by another anomatune command (lock {lock_path}): "
                                     "wait for it to finish or choose another folder") from None
            _HELD[key] = 1
            try:
                yield
            finally:
                _HELD.pop(key, None)
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def claim(self, kind: str, lock: bool = True) -> Iterator["RunFolder"]:
        """Hold the lock of a folder that is (or will be) of ``kind``: refuse one of another kind,
        or with files anomatune did not write, before any work starts."""
        with self.lock() if lock else nullcontext():
            found = self.kind
            if found not in (None, kind):
                what = "files anomatune did not write" if found == "foreign" else f"a {found}"
                raise RunFolderError(f"{self.path} holds {what}: choose another folder (nothing was changed)")
            yield self

    @contextmanager
    def staged(self, kind: str, lock: bool = True) -> Iterator["RunFolder"]:
        """Write a whole new folder of ``kind``: yield a staging folder, swap it in on success.

        On an exception the staging folder is removed and this folder is left as it was.
        A folder of another kind, or with files anomatune did not write, is refused.
        """
        with self.claim(kind, lock):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.path.parent.glob(f".{self.path.name}.staging-*"):  # left by a killed command
                shutil.rmtree(stale, ignore_errors=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.staging-", dir=self.path.parent))
            _usual_mode(str(stage), directory=True)
            try:
                yield RunFolder(stage)
                old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
                if self.path.exists():
                    os.replace(self.path, old)
                    log.info("replaced the previous %s in %s", kind, self.path)
                os.replace(stage, self.path)
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise

    def _target(self, name: str) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self._target(name)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path

    def write_json(self, name: str, data: Any, indent: int | None = 1) -> Path:
        """Strict JSON: NaN (a metric that does not apply) is written as ``null``."""
        return self.write_text(name, json_text(data, indent))

    def write_yaml(self, name: str, data: Any) -> Path:
        return self.write_text(name, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def write_tensors(self, name: str, tensors: dict) -> Path:
        from safetensors.torch import save_file

        path = self._target(name)
        atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))
        return path

    def write_torch(self, name: str, obj: Any) -> Path:
        import torch

        path = self._target(name)
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
        return path

    def write_figure(self, name: str, figure, dpi: int = 100) -> Path:
        """A matplotlib ``Figure`` as PNG."""
        path = self._target(name)
        atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION}))
        return path

    def write_image(self, name: str, image) -> Path:
        """A ``PIL.Image`` as PNG."""
        path = self._target(name)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=PNG_COMPRESSION))
        return path

    @contextmanager
    def open_text(self, name: str) -> Iterator[Any]:
        """A text file written as it goes (UTF-8, no newline translation), renamed into place when closed without error."""
        path = self._target(name)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
                yield handle
            _usual_mode(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_with(self, name: str, write: Callable[[str], Any]) -> Path:
        """Any other file (an exported model): ``write(temporary path)``, then the rename."""
        path = self._target(name)
        atomic_write(path, write)
        return path

    # -- reading ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """``<folder name>@<12 hex digits>``: the SHA-256 of a run's files, the model id in predictions and logs."""
        digest = hashlib.sha256()
        for name in (self.CONFIG, self.DETECTOR, self.PROJECTION):
            path = self.path / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        return f"{self.path.resolve().name}@{digest.hexdigest()[:12]}"

    def _read(self, name: str, parse: Callable[[Path], Any], errors: tuple, what: str, advice: str = "") -> Any:
        """``parse(path)``; a missing file, or one ``parse`` fails on, is one line saying what to do."""
        path = self.path / name
        if not path.is_file():
            raise RunFolderError(f"{path} is missing: the folder is incomplete; rerun the command that writes it")
        try:
            return parse(path)
        except errors as exc:
            raise RunFolderError(f"{path}: {what} ({' '.join(str(exc).split())[:300]}){advice}") from exc

    def read_yaml(self, name: str) -> Any:
        return self._read(name, lambda p: yaml.safe_load(p.read_text(encoding="utf-8")), (yaml.YAMLError, UnicodeDecodeError),
                          "not valid YAML")

    def read_json(self, name: str) -> Any:
        return self._read(name, lambda p: json.loads(p.read_text(encoding="utf-8")), (ValueError,), "not valid JSON")

    def read_tensors(self, name: str) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        return self._read(name, lambda p: load_file(str(p)), (SafetensorError, OSError, ValueError),
                          "cannot read the tensors", "; the file is truncated or damaged: refit the run")

    def read_torch(self, name: str) -> Any:
        """A torch file of plain tensors and containers (``weights_only``: no code is unpickled)."""
        import torch

        return self._read(name, lambda p: torch.load(p, map_location="cpu", weights_only=True), (Exception,),
                          "unreadable", "; delete it to start over")

    @staticmethod
    def openvino_weights(xml: Path) -> Path:
        """The weights file beside an OpenVINO graph (OpenVINO finds it by this name)."""
        return xml.with_suffix(".bin")

    def weights_file(self) -> Path:
        """The fine-tuned backbone of a finished fine-tuning."""
        self.require("finetune")
        if not (self.path / self.BACKBONE).is_file():
            raise RunFolderError(f"{self.path} holds no {self.BACKBONE}: the fine-tuning did not finish; resume it with --resume")
        if (self.read_yaml(self.FINETUNE) or {}).get("fallback"):
            log.warning("%s: the fine-tuning did not beat the frozen backbone on validation, so its %s is the frozen backbone "
                        "(for the last step's weights pass %s)", self.path, self.BACKBONE, self.path / self.LAST_BACKBONE)
        return self.path / self.BACKBONE


def resolve_weights(path: str | Path | None) -> Path | None:
    """A backbone weights file from a file or a fine-tuning folder."""
    if path is None or path == RANDOM:
        return path
    path = Path(path)
    return RunFolder(path).weights_file() if path.is_dir() else path
