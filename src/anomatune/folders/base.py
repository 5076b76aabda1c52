"""A folder anomatune writes, whatever its kind: atomic files, a whole folder written as one set, the lock.

Every file is written atomically (a temporary file in the same folder, then a rename).
:meth:`Folder.staged` writes a whole folder as one set: staged in a hidden folder beside
the target, then swapped in, so a refit never leaves the old metrics or exports beside the
new config, a failed command leaves the folder as it was, and two predictions never mix.
A folder of another kind, or one with files anomatune did not write, is refused rather than
replaced. Writers hold a lock file beside the folder: a second command writing the same
folder stops with one line instead of mixing files. The kinds (``kinds``) subclass
:class:`Folder` with their file names and the ``MARKERS`` that tell them apart.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import RunFolderError

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


def usual_mode(path: str, directory: bool = False) -> None:
    """Temporary files and folders are private (0600/0700); what replaces a user's file gets the usual mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary path)`` in ``path``'s folder, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp)
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


def refuse_inside(out: str | Path, sources: Iterable[str | Path | None], what: str = "--out") -> None:
    """One line, before any work, when ``out`` is one of ``sources`` (what the command reads) or lies inside one."""
    target = Path(out).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        if target == source or source in target.parents:
            raise RunFolderError(
                f"{what} {out} is {'' if target == source else 'inside '}{source}, which this command reads: "
                "choose a place outside it (an output never overwrites an input)"
            )


def _locked(lock_path: Path, folder: Path):
    """The lock file, opened and locked (not waiting: a second writer stops at once).

    A holder removes the file when it is done; if it did so between our open and our lock,
    we hold an orphan, so the file is opened again.
    """
    while True:
        handle = open(lock_path, "a+")  # held open for as long as the lock is
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunFolderError(
                f"{folder} is being written by another anomatune command (lock {lock_path}): "
                "wait for it to finish or choose another folder"
            ) from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


VALIDATION = "validation.safetensors"  # a label-free validation set, cached where it was built (a run, a fine-tuning)


def _ours(name: str) -> bool:
    """The hidden lock, staging and swap files anomatune leaves beside the folders it writes."""
    return name.startswith(".") and (name.endswith(".lock") or ".staging-" in name or ".old-" in name)


class Folder:
    """A folder of one kind (``KIND``, marked by any of ``MARKERS``): atomic writes, staging, lock, reads.

    A subclass per kind sets ``KIND``, ``MARKERS`` and ``COMMAND`` (what writes it) and
    registers itself, so any folder can say which kind it holds.
    """

    KIND: ClassVar[str] = ""
    MARKERS: ClassVar[tuple[str, ...]] = ()
    COMMAND: ClassVar[str] = ""
    kinds: ClassVar[dict[str, type[Folder]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            Folder.kinds[cls.KIND] = cls

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def kind(self) -> str | None:
        """The kind of folder this path holds (``run``, ``finetune``, ...); ``None`` when absent or empty;
        ``foreign`` otherwise."""
        if not self.path.is_dir():
            if self.path.exists():
                return "foreign"
            return None
        for kind, folder in Folder.kinds.items():
            if any((self.path / m).exists() for m in folder.MARKERS):
                return kind
        return "foreign" if any(not _ours(p.name) and p.name != VALIDATION for p in self.path.iterdir()) else None

    def require(self) -> Folder:
        """This folder, if it is of its class's kind; otherwise one line saying what it is and what to pass."""
        found = self.kind
        if found != self.KIND:
            what = (
                "does not exist"
                if found is None and not self.path.exists()
                else ("is empty" if found is None else "is not an anomatune folder" if found == "foreign" else f"holds a {found}")
            )
            raise RunFolderError(f"{self.path} {what}: pass a folder written by '{self.COMMAND}'")
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
        handle = _locked(lock_path, self.path)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            lock_path.unlink(missing_ok=True)  # removed while still held: no lock file stays behind
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextmanager
    def claim(self, *, lock: bool = True) -> Iterator[Folder]:
        """Hold the lock of a folder that is (or will be) of this kind: refuse one of another kind,
        or with files anomatune did not write, before any work starts."""
        with self.lock() if lock else nullcontext():
            found = self.kind
            if found not in (None, self.KIND):
                what = "files anomatune did not write" if found == "foreign" else f"a {found}"
                raise RunFolderError(f"{self.path} holds {what}: choose another folder (nothing was changed)")
            yield self

    @contextmanager
    def staged(self, *, lock: bool = True) -> Iterator[Folder]:
        """Write a whole new folder of this kind: yield a staging folder, swap it in on success.

        On an exception the staging folder is removed and this folder is left as it was.
        A folder of another kind, or with files anomatune did not write, is refused.
        """
        with self.claim(lock=lock):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.path.parent.glob(f".{self.path.name}.staging-*"):  # left by a killed command
                shutil.rmtree(stale, ignore_errors=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.staging-", dir=self.path.parent))
            usual_mode(str(stage), directory=True)
            try:
                yield type(self)(stage)
                old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
                if self.path.exists():
                    os.replace(self.path, old)
                    log.info("replaced the previous %s in %s", self.KIND, self.path)
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

    def write_tensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        path = self._target(name)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
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
            usual_mode(tmp)
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
        return self._read(
            name, lambda p: yaml.safe_load(p.read_text(encoding="utf-8")), (yaml.YAMLError, UnicodeDecodeError), "not valid YAML"
        )

    def read_json(self, name: str) -> Any:
        return self._read(name, lambda p: json.loads(p.read_text(encoding="utf-8")), (ValueError,), "not valid JSON")

    def read_tensors(self, name: str) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load

        return self._read(
            name,
            lambda p: load(p.read_bytes()),  # into memory, not mapped: a file changed or cut later cannot touch them
            (SafetensorError, OSError, ValueError),
            "cannot read the tensors",
            "; the file is truncated or damaged: refit the run",
        )

    def read_torch(self, name: str) -> Any:
        """A torch file of plain tensors and containers (``weights_only``: no code is unpickled)."""
        import torch

        return self._read(
            name,
            lambda p: torch.load(p, map_location="cpu", weights_only=True),
            (Exception,),
            "unreadable",
            "; delete it to start over",
        )
