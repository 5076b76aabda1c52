"""Operator feedback on a served model, append-only, in the model's folder: ``MODEL/feedback/``.

``feedback.jsonl`` holds one JSON line per verdict: the part (the SHA-256 of its image), the
result id and file name it was scored under, the version that scored it, its score, the
verdict (``good``, ``defect``, or ``none`` to withdraw one), the operator's note, the stored
image and mask; ``images/`` and ``masks/`` hold the files, each image stored once whatever
the number of verdicts on it. The versions of the model share it. The server also records each verdict in the
inspections store (``anomatune.store``), which is what ``update --feedback`` reads (the last verdict on each part,
every station's when the store is shared); lines the store lacks are imported from here first (every line stays in
the log).

Nothing stored is ever lost or corrupted by a crash: each file is written atomically (a
temporary file, then a rename) *before* its line, and a line is appended with a single
``write`` on a file opened for appending, under a lock, then flushed to disk. A ``kill -9``
can cut at most the line in flight; the next writer or reader drops that partial line, so
the stored lines are always a prefix of what was sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import RunFolderError
from .base import atomic_write, json_text
from .kinds import ModelFolder, RunFolder

try:
    import fcntl
except ImportError:  # not POSIX: the in-process lock only
    fcntl = None

log = logging.getLogger(__name__)

VERDICTS = ("good", "defect")  # good: a false alarm (the part is good); defect: a missed or confirmed defect
WITHDRAWN = "none"  # the operator takes the part's verdict back (the page's undo)


class FeedbackStore:
    """The feedback of the model at ``folder`` (or of the model a version folder belongs to): :meth:`add` a verdict,
    read :meth:`records` (every line) or :meth:`verdicts` (the last on each part)."""

    LOG = "feedback.jsonl"
    IMAGES = "images"
    MASKS = "masks"

    def __init__(self, folder: str | Path):
        self.path = RunFolder(folder).model_path / ModelFolder.FEEDBACK
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    @property
    def log_path(self) -> Path:
        return self.path / self.LOG

    def add(self, image: bytes, suffix: str, record: dict[str, Any], mask_png: bytes | None = None) -> dict[str, Any]:
        """Store an image (its bytes as uploaded, ``suffix`` like ``.png``; once per content), its optional mask and
        one line: ``record`` (verdict, model, score, threshold, note, result id, file name, ...) with the line's id,
        the time, the part (the image's SHA-256) and the files' paths."""
        entry_id = uuid.uuid4().hex
        part = hashlib.sha256(image).hexdigest()
        entry = {"id": entry_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "part": part, **record}
        entry["image"] = self._write(f"{self.IMAGES}/{part[:32]}{suffix.lower() or '.png'}", image)
        entry["mask"] = self._write(f"{self.MASKS}/{entry_id}.png", mask_png) if mask_png is not None else None
        self._append(json_text(entry, indent=None).encode("utf-8"))
        return entry

    def _write(self, name: str, data: bytes) -> str:
        path = self.path / name
        if not path.is_file():  # content-addressed images: a second verdict on the part stores nothing again
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return name

    def _append(self, line: bytes) -> None:
        """One complete line at the end of the log, on disk when this returns."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # other processes serving the same run
                self._drop_partial_line(fd)
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the lock

    def _drop_partial_line(self, fd: int) -> None:
        """A last line without its newline was cut by a crash: it goes, so the next line starts clean."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        tail_start = max(0, size - 1_048_576)
        tail = os.pread(fd, size - tail_start, tail_start)
        keep = tail_start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        os.ftruncate(fd, keep)
        log.warning("%s: dropped a partial last line (a write cut by a crash)", self.log_path)

    def records(self) -> list[dict[str, Any]]:
        """Every complete line, oldest first (a partial last line is not a record)."""
        if not self.log_path.is_file():
            return []
        text = self.log_path.read_bytes()
        complete = text[: text.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]

    def file(self, name: str) -> Path:
        """The stored file a record names, refused in one line if it lies outside the store (a hand-edited line)."""
        path = (self.path / name).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise RunFolderError(f"{self.log_path}: a line names {name!r}, outside the feedback store: remove that line")
        return path
