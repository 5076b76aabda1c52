"""What ``predict`` scores: image files, folders, glob patterns, or manifests listing paths.

Every engine expands its inputs here, so the local and the Ray ``predict`` score the same
images in the same order. A manifest is a CSV or Parquet file with a ``path`` column (other
columns are ignored); relative paths in it are relative to the manifest's folder. Paths
are not opened here: a listed file that is missing or unreadable becomes a row with its
error when it is scored, never a failed job.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, list_images

MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMN = "path"


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def read_manifest(path: Path) -> list[Path]:
    """The ``path`` column of a CSV or Parquet manifest, relative paths taken from the manifest's folder."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if PATH_COLUMN not in (reader.fieldnames or ()):
                raise DataError(f"{path}: a manifest needs a '{PATH_COLUMN}' column, found {reader.fieldnames or 'no header'}")
            entries = [row[PATH_COLUMN] for row in reader]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading a Parquet manifest needs pyarrow: pip install 'anomatune[ray]'") from None
        try:
            table = pq.read_table(path, columns=[PATH_COLUMN])
        except Exception as exc:  # pyarrow's errors have no common base; the message names the problem
            raise DataError(f"{path}: not a Parquet manifest with a '{PATH_COLUMN}' column ({exc})") from None
        entries = table.column(PATH_COLUMN).to_pylist()
    if any(not entry for entry in entries):
        raise DataError(f"{path}: row {next(i for i, e in enumerate(entries) if not e) + 2} has an empty '{PATH_COLUMN}'")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def expand_sources(inputs: Sequence[str | Path]) -> list[Path]:
    """Image paths, in the order given: folders searched recursively (sorted), glob patterns
    expanded (sorted), manifests read, files as they are. A folder, pattern or manifest that
    yields nothing, or a path that does not exist, is an error up front."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            paths += list_images(path, recursive=True)
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            found = read_manifest(path)
            if not found:
                raise DataError(f"manifest {path} lists no images")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif _is_pattern(text):
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if not found:
                raise DataError(f"the pattern {text} matches no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            paths += found
        else:
            raise DataError(f"{text} does not exist: pass image files, folders, glob patterns or a CSV/Parquet manifest")
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, inputs))}")
    return paths
