"""Which layout a set of data settings describes, and the dataset for a split of it.

Three layouts: your own folders (``--good``, with ``--defect`` / ``--masks`` /
``--good-test`` for evaluation), the MVTec AD layout (``--data ROOT --category C``, or
``--data`` pointing at the category folder itself) and the VisA layout
(``--data ROOT --category C`` where ``ROOT/split_csv/1cls.csv`` lists the images).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..errors import DataError
from .datasets import AnomalyDataset, Folder, MVTecAD, VisA
from .settings import DEFAULT_IMAGE_SIZE, DataSettings

log = logging.getLogger(__name__)

LAYOUTS = ("folder", "mvtec", "visa")
LAYOUT_HELP = (
    "the layouts are: --good DIR (a folder of good images; --defect DIR, --masks DIR for evaluation), "
    "--data ROOT --category C in the MVTec AD layout (C/train/good, C/test/<type>, C/ground_truth/<type>), "
    "or --data ROOT --category C in the VisA layout (ROOT/split_csv/1cls.csv)"
)


def detect_layout(settings: DataSettings) -> tuple[str, DataSettings]:
    """The layout and the settings made explicit (an MVTec AD category folder becomes root + category)."""
    if settings.good:
        return "folder", settings
    if not settings.data:
        raise DataError(f"no images given: {LAYOUT_HELP}")
    root = Path(settings.data)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder: {LAYOUT_HELP}")
    visa = (root / VisA.SPLIT_CSV).is_file()
    if settings.category:
        if visa:
            return "visa", settings
        if (root / settings.category / "train").is_dir() or not (root / settings.category).is_dir():
            return "mvtec", settings  # MVTecAD names the available categories when this one is missing
        raise DataError(f"{root / settings.category} has no train/ folder and {root} no {VisA.SPLIT_CSV}: {LAYOUT_HELP}")
    if (root / "train").is_dir():
        return "mvtec", settings.updated(data=str(root.parent), category=root.name)
    categories = mvtec_categories(root)
    if visa or categories:
        names = categories if categories else "the objects in " + str(root / VisA.SPLIT_CSV)
        raise DataError(f"{root} holds several categories: pass --category (one of {', '.join(names) if categories else names})")
    raise DataError(f"{root} is in no known layout: {LAYOUT_HELP}")


def mvtec_categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir())


def list_categories(settings: DataSettings) -> list[str]:
    """Every category of the dataset root ``--data`` (MVTec AD: the folders with a train/; VisA: the csv's objects)."""
    if not settings.data or not Path(settings.data).is_dir():
        raise DataError(f"--category all needs --data ROOT, a dataset root holding categories (got {settings.data or 'none'})")
    root = Path(settings.data)
    if (root / VisA.SPLIT_CSV).is_file():
        with open(root / VisA.SPLIT_CSV, newline="", encoding="utf-8") as f:
            found = sorted({row.get("object", "") for row in csv.DictReader(f)} - {""})
    else:
        found = mvtec_categories(root)
    if not found:
        raise DataError(f"{root} holds no categories (folders with a train/ subfolder, or {VisA.SPLIT_CSV}): {LAYOUT_HELP}")
    return found


def open_dataset(
    settings: DataSettings | None = None, split: str = "train", image_size=DEFAULT_IMAGE_SIZE, **changes
) -> AnomalyDataset:
    """The ``split`` of the data that ``settings`` (or the keyword arguments of ``DataSettings``) describe.

    ``image_size``: a short side, ``"WxH"`` or an exact ``(height, width)``.
    """
    settings = (settings or DataSettings()).updated(**changes)
    layout, settings = detect_layout(absolute(settings))
    if layout == "folder":
        dataset = Folder(
            settings.good,
            settings.defect,
            settings.masks,
            settings.good_test,
            test_split=settings.test_split,
            split_seed=settings.split_seed,
            split=split,
            image_size=image_size,
        )
    elif layout == "mvtec":
        dataset = MVTecAD(settings.data, settings.category, split, image_size)
    else:
        dataset = VisA(settings.data, settings.category, split, image_size)
    log.info("data: %s layout, %s (%d images)", layout, dataset.name, len(dataset))
    dataset.source = settings
    return dataset


def absolute(settings: DataSettings) -> DataSettings:
    """The same settings with absolute paths: a run remembers its data wherever it is evaluated from."""

    def full(path):
        return str(Path(path).expanduser().resolve()) if path else path

    return settings.updated(
        data=full(settings.data),
        good=full(settings.good),
        good_test=full(settings.good_test),
        defect=tuple(full(d) for d in settings.defect),
        masks=full(settings.masks),
    )


def data_name(settings: DataSettings) -> str:
    """A short name of the data, for tables and titles."""
    return settings.category or Path(settings.good or settings.data or "?").name
