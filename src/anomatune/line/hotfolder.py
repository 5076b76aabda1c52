"""``anomatune watch``: a hot folder a camera writes into, each image scored exactly once across crashes.

A file is read only once complete: its size and modification time unchanged for ``settle`` seconds (a camera still
writing is waited for; ``.*``, ``*.tmp`` and ``*.part`` names, which writers rename when done, are never read). It is
then claimed by one rename into ``DIR/.anomatune/`` (the same file system: a claim is atomic), scored with the
model's served version, recorded in the store (a row keyed by the file's name and content digest, committed before
the file moves on), and moved into ``DIR/done/`` or ``DIR/failed/``. A ``kill -9`` anywhere leaves the file either
in the folder (read again), claimed without a row (scored again: no row yet) or claimed with its row (moved on, not
scored again): every image ends with exactly one row. File events (watchdog) wake the loop; the folder is also
looked at every ``interval`` seconds, which is all ``--poll`` does (network shares send no events).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import IMAGE_EXTENSIONS, read_image
from ..errors import AnomatuneError, DataError
from ..folders.base import atomic_write
from ..folders.kinds import RunFolder, folder_stamp, open_run
from ..inference.predict import draw
from ..pipeline.pipeline import Pipeline
from ..store import InspectionStore, StoreSettings
from .mqtt import Publisher
from .settings import MqttSettings, WatchSettings

log = logging.getLogger(__name__)

CLAIMED, DONE, FAILED, OVERLAYS = ".anomatune", "done", "failed", "overlays"
RETENTION_EVERY = 60.0  # seconds between two prunings of the scored files
UNFINISHED = (".tmp", ".part", ".partial", ".crdownload", ".filepart")  # names writers give a file before renaming it


@dataclass
class Sighting:
    """A file as last seen: it is complete once this has not changed for ``settle`` seconds."""

    size: int
    mtime_ns: int
    since: float


class HotFolder:
    """The complete images of a folder, claimed one by one, and where they go once their result is stored."""

    def __init__(self, folder: str | Path, settle: float = 1.0, keep: bool = False):
        self.path = Path(folder).expanduser()
        if not self.path.is_dir():
            raise AnomatuneError(f"{self.path}: no such folder to watch (--in): create it or give the camera's folder")
        self.settle, self.keep = settle, keep
        self.claimed_dir = self.path / CLAIMED
        for sub in (self.claimed_dir, self.path / DONE, self.path / FAILED, self.path / OVERLAYS):
            sub.mkdir(exist_ok=True)
        self.seen: dict[str, Sighting] = {}
        self.handled: set[tuple[str, int, int]] = set()  # --after keep: files already recorded, not read again

    def left_claimed(self) -> list[Path]:
        """Files claimed before a crash: complete, read first."""
        return sorted(p for p in self.claimed_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def waiting(self) -> bool:
        """Whether a file is still settling (``--once`` waits for it)."""
        return bool(self.seen)

    def ready(self, limit: int) -> list[Path]:
        """Up to ``limit`` files complete since the last look, oldest first; the others are remembered."""
        now, ready, present = time.monotonic(), [], set()
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as exc:  # a network share gone for a moment: looked at again later
            log.warning("%s: cannot list the folder (%s)", self.path, exc)
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower().endswith(UNFINISHED) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                stat = entry.stat()
            except OSError:  # renamed or removed meanwhile
                continue
            if not entry.is_file() or (name, stat.st_size, stat.st_mtime_ns) in self.handled:
                continue
            present.add(name)
            seen = self.seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self.seen[name] = Sighting(stat.st_size, stat.st_mtime_ns, now)
            elif now - seen.since >= self.settle and len(ready) < limit:
                ready.append(Path(entry.path))
        for name in set(self.seen) - present:
            del self.seen[name]
        return ready

    def claim(self, path: Path) -> Path | None:
        """Take a complete file out of the camera's way (one rename); None when it went meanwhile."""
        self.seen.pop(path.name, None)
        if self.keep:
            return path
        target = self.claimed_dir / path.name
        if target.exists():  # the same name is still being handled: taken at a later look
            return None
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        return target

    def destination(self, path: Path, failed: bool) -> Path:
        """Where a claimed file goes once recorded: ``done/NAME`` (``failed/NAME``), numbered when the name is taken."""
        if self.keep:
            return path
        folder = self.path / (FAILED if failed else DONE)
        target, n = folder / path.name, 1
        while target.exists():
            target, n = folder / f"{path.stem}_{n}{path.suffix}", n + 1
        return target

    def finish(self, path: Path, target: Path) -> None:
        """The file leaves the claimed folder for ``target`` (with ``--after keep``: it stays, remembered)."""
        if self.keep:
            stat = path.stat()
            self.handled.add((path.name, stat.st_size, stat.st_mtime_ns))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def prune(folders: list[Path], keep_days: float | None, keep_bytes: float | None, now: float | None = None) -> int:
    """Delete the files of ``folders`` older than ``keep_days`` and then the oldest beyond ``keep_bytes`` in all;
    returns how many went (the store's rows stay)."""
    files = sorted(((p.stat().st_mtime, p.stat().st_size, p) for f in folders for p in f.iterdir() if p.is_file()),
                   key=lambda entry: entry[0])  # fmt: skip
    now = time.time() if now is None else now
    total, removed = sum(size for _, size, _ in files), 0
    for mtime, size, path in files:
        too_old = keep_days is not None and now - mtime > keep_days * 86400
        too_big = keep_bytes is not None and total > keep_bytes
        if not (too_old or too_big):
            continue
        path.unlink(missing_ok=True)
        total, removed = total - size, removed + 1
    return removed


def source_key(name: str, data: bytes) -> str:
    """A file once: its name and content (a camera reusing a name for a new part makes a new key)."""
    return f"{name}:{hashlib.sha256(data).hexdigest()[:32]}"


class Watcher:
    """Scores a hot folder with a model's served version (reloaded when another version is promoted), records every
    inspection in the store and publishes it over MQTT when asked."""

    def __init__(
        self,
        model: str | Path,
        settings: WatchSettings,
        mqtt: MqttSettings | None = None,
        store: StoreSettings | None = None,
        **runtime: Any,
    ):
        self.model, self.settings, self.runtime = Path(model), settings, runtime
        if settings.folder is None:
            raise AnomatuneError("give the folder to watch: --in DIR")
        open_run(model)  # one line when the model folder is not one
        self.folder = HotFolder(settings.folder, settings.settle, keep=settings.after == "keep")
        self.name = RunFolder(model).model_path.name  # the model's name (the folder a version belongs to)
        self.store = InspectionStore.chosen(store, RunFolder(model).model_path)
        self.publisher = Publisher(mqtt, self.store) if mqtt is not None and mqtt.url else None
        self.scored = 0
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._stamp = None
        self._retained = -math.inf
        self._reload()

    def _reload(self) -> None:
        """The served version, loaded again when the model's alias moved (``anomatune promote``, an update)."""
        stamp = folder_stamp(self.model)
        if stamp == self._stamp:
            return
        self.pipeline = Pipeline.load(self.model, **self.runtime)
        self._stamp = stamp
        log.info("watch: scoring with %s (version %s)", self.pipeline.model_id_, getattr(self.pipeline, "version_", "-"))
        if self.publisher is not None:
            self.publisher.status(self.name, version=getattr(self.pipeline, "version_", None),
                                  model_id=self.pipeline.model_id_, threshold=self.pipeline.threshold)  # fmt: skip

    def _retain(self) -> None:
        """At most once a minute: the scored images and overlays beyond ``keep_days`` or ``keep_gb`` go."""
        s = self.settings
        if (s.keep_days is None and s.keep_gb is None) or time.monotonic() - self._retained < RETENTION_EVERY:
            return
        self._retained = time.monotonic()
        folders = [self.folder.path / name for name in (DONE, FAILED, OVERLAYS)]
        removed = prune(folders, s.keep_days, None if s.keep_gb is None else s.keep_gb * 1e9)
        if removed:
            log.info("watch: %d scored images and overlays deleted (--keep-days, --keep-gb); their rows stay", removed)

    def wake(self) -> None:
        """A file event: look at the folder now."""
        self._wake.set()

    def stop(self) -> None:
        """End :meth:`run` after the batch in hand (from another thread: a server's shutdown, a test)."""
        self._stopping.set()
        self._wake.set()

    def run(self) -> int:
        """Watch until interrupted (or, with ``once``, until the folder is empty); returns the images scored."""
        observer = None if self.settings.poll else self._observe()
        if self.publisher is not None:
            self.publisher.start()
        try:
            while not self._stopping.is_set():
                self._reload()
                self._retain()
                batch = self.folder.left_claimed()[: self.settings.batch]
                room = self.settings.batch - len(batch)
                batch += [p for p in map(self.folder.claim, self.folder.ready(room) if room else []) if p is not None]
                if batch:
                    self.process(batch)
                    continue
                if self.settings.once and not self.folder.waiting():
                    return self.scored
                self._wake.wait(self.settings.interval if not self.folder.waiting() else min(self.settings.interval, 0.2))
                self._wake.clear()
            return self.scored
        finally:
            if observer is not None:
                observer.stop()
                observer.join()
            if self.publisher is not None:
                self.publisher.stop()
            self.store.close()

    def _observe(self):
        """File events from watchdog wake the loop (a missing watchdog leaves the polling)."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog is not installed (pip install 'anomatune[line]'): polling %s", self.folder.path)
            return None
        watcher = self

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                watcher.wake()

        observer = Observer()
        observer.schedule(Wake(), str(self.folder.path), recursive=False)
        observer.start()
        return observer

    def process(self, paths: list[Path]) -> None:
        """Score claimed files in one forward pass; each file's row is committed before the file moves on."""
        fresh = []
        for path in paths:
            data = path.read_bytes()
            key = source_key(path.name, data)
            recorded = self.store.find(self.store.station, key)
            if recorded is not None:  # recorded before a crash: only the move was left
                target = Path(recorded["image_path"]) if recorded["image_path"] else self.folder.destination(path, False)
                self.folder.finish(path, target)
                continue
            try:
                image = read_image(io.BytesIO(data), name=path.name, max_pixels=self.pipeline.runtime.max_pixels)
            except DataError as exc:
                log.error("%s", exc)
                target = self.folder.destination(path, failed=True)
                self._record(path, key, target, verdict="failed", error=str(exc))
                self.folder.finish(path, target)
                continue
            fresh.append((path, key, image))
        if not fresh:
            return
        predictions = self.pipeline.predict([image for _, _, image in fresh])
        for n, (path, key, image) in enumerate(fresh):
            overlay_path = None
            if self.settings.overlays:
                overlay, _ = draw(self.pipeline, image, predictions.maps[n], predictions.masks[n], predictions.pixel_threshold)
                digest = key.rpartition(":")[2]
                overlay_path = self.folder.path / OVERLAYS / f"{path.stem}-{digest[:12]}.png"
                atomic_write(overlay_path, lambda tmp, overlay=overlay: overlay.save(tmp, format="PNG"))
            labels = predictions.labels
            verdict = "unknown" if labels is None else "defect" if labels[n] else "good"
            calibrated = predictions.normalized is not None
            target = self.folder.destination(path, failed=False)
            self._record(
                path,
                key,
                target,
                verdict=verdict,
                score=float(predictions.scores[n]),
                normalized=float(predictions.normalized[n]) if calibrated else None,
                false_alarm_rate=float(predictions.false_alarm_rates[n]) if calibrated else None,
                threshold=predictions.threshold,
                overlay_path=None if overlay_path is None else str(overlay_path),
            )
            self.folder.finish(path, target)
            self.scored += 1
        if self.publisher is not None:
            self.publisher.notify()

    def _record(self, path: Path, key: str, target: Path, **values: Any) -> None:
        self.store.add(
            source="watch",
            source_key=key,
            model=self.name,
            version=getattr(self.pipeline, "version_", None),
            model_id=getattr(self.pipeline, "model_id_", None),
            file_name=path.name,
            image_path=str(target.resolve()),
            **values,
        )
