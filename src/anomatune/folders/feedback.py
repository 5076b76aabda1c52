"""Operator feedback on a served run, append-only, beside the run: ``<run>.feedback/``.

``feedback.jsonl`` holds one JSON line per verdict (time, model version, score, threshold,
verdict, note, the stored image and mask); ``images/`` and ``masks/`` hold the files. It lies
beside the run, not inside it, so that a refit or an ``anomatune update`` in place (which
replace the run folder as one set) never takes it away.

Nothing stored is ever lost or corrupted by a crash: each file is written atomically (a
temporary file, then a rename) *before* its line, and a line is appended with a single
``write`` on a file opened for appending, under a lock, then flushed to disk. A ``kill -9``
can cut at most the line in flight; the next writer or reader drops that partial line, so
the stored lines are always a prefix of what was sent.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .base import atomic_write, json_text

try:
    import fcntl
except ImportError:  # not POSIX: the in-process lock only
    fcntl = None

log = logging.getLogger(__name__)

VERDICTS = ("good", "defect")  # good: a false alarm (the part is good); defect: a missed or confirmed defect


class FeedbackStore:
    """The feedback of the run at ``run_dir``: :meth:`add` a verdict, read :meth:`records`."""

    LOG = "feedback.jsonl"
    IMAGES = "images"
    MASKS = "masks"

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir).resolve()  # "serve ." too: beside the folder, never inside it
        self.path = run_dir.parent / f"{run_dir.name}.feedback"
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    @property
    def log_path(self) -> Path:
        return self.path / self.LOG

    def add(self, image: bytes, suffix: str, record: dict[str, Any], mask_png: bytes | None = None) -> dict[str, Any]:
        """Store an image (its bytes as uploaded, ``suffix`` like ``.png``), its optional mask and one line:
        ``record`` (verdict, model, score, threshold, note, ...) with the id, the time and the files' paths."""
        entry_id = uuid.uuid4().hex
        entry = {"id": entry_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
        entry["image"] = self._write(f"{self.IMAGES}/{entry_id}{suffix.lower() or '.png'}", image)
        entry["mask"] = self._write(f"{self.MASKS}/{entry_id}.png", mask_png) if mask_png is not None else None
        self._append(json_text(entry, indent=None).encode("utf-8"))
        return entry

    def _write(self, name: str, data: bytes) -> str:
        path = self.path / name
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
        """The stored file a record names."""
        return self.path / name
