"""Datasets: the MVTec AD and VisA layouts, your own folders, and natural photos.

Every dataset is a list of records (path, label, defect type, mask path) read lazily.
Items are dicts: ``image`` (3, H, W) float in [0, 1], RGB, resized to the dataset's input
size; ``label`` (0 good, 1 defective); ``defect_type``; ``path``; ``mask`` ((1, H, W) of
0/1, all zero for good images) or ``None`` when the dataset has no ground truth.
Normalisation belongs to the backbone (the feature extractor applies it), so one dataset
serves any backbone and the colour transfer works on plain RGB. Batch items with
:func:`collate`.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import (
    IMAGE_EXTENSIONS,
    check_mask_shape,
    image_to_tensor,
    input_size,
    list_images,
    log_once,
    mask_to_tensor,
    median_aspect,
    read_image,
    read_mask,
    unreadable,
)
from .settings import DEFAULT_IMAGE_SIZE

GOOD = "good"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Record:
    """One image of a dataset: where it is and what it is."""

    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask_path: Path | None = None


def require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder: {hint}")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', not {split!r}")


class AnomalyDataset(Dataset):
    """Base of the labelled datasets: records, loaded lazily, resized to one input size.

    ``image_size``: the short side in pixels (the long side follows the median aspect
    ratio of the dataset's images), ``"WxH"``, or an exact ``(height, width)``.
    """

    siblings: Sequence[Path] = ()  # images of the same folder in another split: checked with these (check_readable)

    def __init__(self, records: Sequence[Record], has_masks: bool, image_size=DEFAULT_IMAGE_SIZE, name: str = "dataset"):
        if not records:
            raise DataError(f"{name} holds no images: add image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.records = list(records)
        self.has_masks = has_masks
        self.image_size = image_size
        self.name = name
        self.source = None  # the DataSettings it was opened from (open_dataset sets it); saved with a run
        self.max_pixels: int | None = None  # images over it are refused before they are decoded (see within)

    @cached_property
    def aspect(self) -> float:
        """The median width / height of the images (read from their headers)."""
        return median_aspect(r.path for r in self.records)

    def size_for(self, image_size) -> tuple[int, int]:
        """The ``(height, width)`` that ``image_size`` gives these images: a short side follows their median aspect ratio."""
        fixed = isinstance(image_size, tuple) or "x" in str(image_size)
        return input_size(image_size, 1.0 if fixed else self.aspect)

    @cached_property
    def size_hw(self) -> tuple[int, int]:
        """``(height, width)`` every image is resized to."""
        return self.size_for(self.image_size)

    def at_size(self, size_hw: tuple[int, int]) -> AnomalyDataset:
        """The same images resized to ``(height, width)`` (a model's input size)."""
        view = copy.copy(self)
        view.__dict__.pop("size_hw", None)
        view.image_size = tuple(size_hw)
        return view

    def check_readable(self) -> None:
        """One error naming every image that cannot be read (headers and PNG checksums), before a long job starts; the
        images of the same folder drawn into the test split (``siblings``) too, so that none is found only later."""
        problems = unreadable([*(r.path for r in self.records), *self.siblings], self.max_pixels)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            total = len(self) + len(self.siblings)
            raise DataError(f"{len(problems)} of {total} images cannot be used: {shown}. Replace or remove them")

    def within(self, max_pixels: int | None) -> AnomalyDataset:
        """The same images, each refused (:class:`~anomatune.data.images.ImageTooLarge`) when over ``max_pixels``."""
        view = copy.copy(self)
        view.max_pixels = max_pixels
        return view

    def subset(self, indices: Sequence[int]) -> AnomalyDataset:
        """The records at ``indices``, same settings."""
        view = copy.copy(self)
        view.records = [self.records[i] for i in indices]
        view.__dict__.pop("aspect", None)
        view.__dict__.pop("size_hw", None)
        return view

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        img = read_image(record.path, max_pixels=self.max_pixels)
        mask = None
        if self.has_masks:
            if record.mask_path is None:
                mask = torch.zeros(1, *self.size_hw)
            else:
                raw = read_mask(record.mask_path)
                check_mask_shape(raw.shape[::-1], img.size, record.mask_path, record.path)
                mask = mask_to_tensor(raw, self.size_hw)
        return {
            "image": image_to_tensor(img, self.size_hw),
            "label": record.label,
            "defect_type": record.defect_type,
            "path": str(record.path),
            "mask": mask,
        }


def seeded_split(n: int, n_held: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``0..n-1`` split (seeded) into the kept ones and ``n_held`` held out, each in order: the one hold-out
    draw of a folder's good test images, the pipeline's threshold images and the fine-tuning's validation images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_held:]), sorted(order[:n_held])


KEY_SCALE = 2.0**-53  # a 64-bit hash's top 53 bits, as a uniform float64 in [0, 1)


def row_keys(seed: int, start: int, count: int) -> torch.Tensor:
    """Seeded uniform keys in [0, 1) of rows ``start`` … ``start + count − 1``, each a function of (seed, row) alone
    (the splitmix64 hash): a sample of the rows with the smallest keys, extended by later rows, is still the sample
    a single pass over all of them draws (what ``PatchCore.partial_fit`` relies on)."""
    mask = 2**64 - 1
    rows = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = rows + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & mask)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * KEY_SCALE)


class RowSample:
    """A seeded sample of at most ``cap`` of ``total`` rows that arrive batch by batch (all of them when
    ``total <= cap`` or ``cap`` is None): what PatchCore and the PCA keep, drawn before any row is copied.
    The rows kept are the ``cap`` with the smallest :func:`row_keys` (rows ``offset`` … of the stream), in their
    arrival order; ``keys`` are the kept rows' keys and ``rows`` their positions in the stream."""

    def __init__(self, total: int, cap: int | None, seed: int, offset: int = 0):
        keys = row_keys(seed, offset, total)
        keep_all = cap is None or total <= cap
        self.chosen = None if keep_all else torch.topk(keys, cap, largest=False).indices.sort().values
        self.keys = keys if keep_all else keys[self.chosen]
        self.rows = torch.arange(offset, offset + total) if keep_all else self.chosen + offset  # the kept rows' positions
        self.start = 0

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """The sampled ones among the next ``len(rows)`` rows."""
        start, self.start = self.start, self.start + len(rows)
        if self.chosen is None:
            return rows
        mine = self.chosen[(self.chosen >= start) & (self.chosen < self.start)] - start
        return rows[mine.to(rows.device)]


def collate(batch: Sequence[dict]) -> dict:
    """Batch dataset items; ``mask`` stays ``None`` when the dataset has no ground truth."""
    masks = [item["mask"] for item in batch]
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "label": torch.tensor([item["label"] for item in batch]),
        "defect_type": [item["defect_type"] for item in batch],
        "path": [item["path"] for item in batch],
        "mask": None if any(m is None for m in masks) else torch.stack(masks),
    }


def find_mask(folder: Path, stem: str) -> Path | None:
    """``<stem>_mask.<ext>`` or ``<stem>.<ext>`` in ``folder``."""
    for suffix in ("_mask", ""):
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp"):
            candidate = folder / f"{stem}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


class MVTecAD(AnomalyDataset):
    """A category in the MVTec AD layout.

    ``root/category/train/good``, ``root/category/test/<good|defect>`` and, when pixel
    labels exist, ``root/category/ground_truth/<defect>/<id>_mask.png``. Without
    ``ground_truth`` the masks are ``None`` and pixel metrics are skipped later.
    """

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size=DEFAULT_IMAGE_SIZE):
        root = require_dir(Path(root), "dataset root", "pass the folder that holds the category folders")
        category_dir = root / category
        if not category_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"category {category!r} not found in {root}: available are {', '.join(available) or 'none'}")
        _check_split(split)
        split_dir = require_dir(
            category_dir / split, f"{split} split", f"expected the MVTec AD layout {category}/{split}/good/..."
        )
        gt_dir = category_dir / "ground_truth"
        has_masks = gt_dir.is_dir()
        if not has_masks and split == "test":
            log_once(
                f"nogt:{category_dir}",
                "%s has no ground_truth folder: masks are None, pixel metrics will be skipped",
                category_dir,
            )
        records = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            images = list_images(defect_dir)
            if defect == GOOD:
                records += [Record(p, 0, GOOD) for p in images]
                continue
            if split == "train":
                raise DataError(f"{defect_dir}: the train split holds good images only; move defective images to test/")
            masks = self._match_masks(images, gt_dir / defect) if has_masks else {}
            records += [Record(p, 1, defect, masks.get(p)) for p in images]
        super().__init__(records, has_masks, image_size, name=str(split_dir))

    @staticmethod
    def _match_masks(images: list[Path], mask_dir: Path) -> dict[Path, Path]:
        """Pair every defect image with its mask, and every mask with its image."""
        masks = {}
        for img in images:
            mask = find_mask(mask_dir, img.stem)
            if mask is None:
                raise DataError(f"{img}: no mask {mask_dir / (img.stem + '_mask.png')}; add the mask or remove the image")
            masks[img] = mask
        stems = {img.stem for img in images}
        if mask_dir.is_dir():
            for mask in list_images(mask_dir):
                stem = mask.stem.removesuffix("_mask")
                if stem not in stems:
                    raise DataError(
                        f"{mask}: mask without an image (expected {stem}.* in test/{mask_dir.name}); add the image or remove the mask"
                    )
        return masks


class VisA(AnomalyDataset):
    """A category in the VisA layout: ``root/split_csv/1cls.csv`` lists every image.

    Its columns are ``object, split, label, image, mask`` (``label`` normal or anomaly;
    paths relative to ``root``). VisA has no defect types: defective images are "anomaly".
    """

    SPLIT_CSV = Path("split_csv") / "1cls.csv"
    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(self, root: str | Path, category: str, split: str = "train", image_size=DEFAULT_IMAGE_SIZE):
        root = require_dir(Path(root), "dataset root", "pass the VisA folder that holds split_csv/")
        _check_split(split)
        csv_path = root / self.SPLIT_CSV
        try:
            with open(csv_path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{csv_path}: cannot read the split file ({exc})") from exc
        if not rows or not set(self.COLUMNS) <= set(rows[0]):
            raise DataError(f"{csv_path}: expected the columns {', '.join(self.COLUMNS)}")
        objects = sorted({r["object"] for r in rows})
        if category not in objects:
            raise DataError(f"category {category!r} not in {csv_path}: available are {', '.join(objects)}")
        records = []
        for row in (r for r in rows if r["object"] == category and r["split"] == split):
            if row["label"] not in ("normal", "anomaly"):
                raise DataError(f"{csv_path}: label {row['label']!r} of {row['image']} must be normal or anomaly")
            path, mask = root / row["image"], (root / row["mask"]) if row["mask"] else None
            for file in (path, mask):
                if file is not None and not file.is_file():
                    raise DataError(f"{file} (listed in {csv_path}) does not exist")
            good = row["label"] == "normal"
            records.append(Record(path, 0 if good else 1, GOOD if good else "anomaly", mask))
        has_masks = split == "test" and any(r.mask_path for r in records)
        super().__init__(records, has_masks, image_size, name=f"{split} split of {category} in {root}")


class Folder(AnomalyDataset):
    """Your own folders: good images, optional defective folders and masks.

    ``split="train"`` gives good images; ``split="test"`` gives the good test images
    (``good_test_dir``, or else a seeded ``test_split`` share of ``good_dir``) plus every
    image of ``defect_dirs`` (defect type = folder name); ``open_dataset`` gives the
    defaults of ``DataSettings``. Masks are looked up in
    ``mask_dir/<defect folder name>/`` then ``mask_dir/`` as ``<stem>_mask.*`` or ``<stem>.*``.
    """

    def __init__(
        self,
        good_dir: str | Path,
        defect_dirs: Sequence[str | Path] = (),
        mask_dir: str | Path | None = None,
        good_test_dir: str | Path | None = None,
        *,
        test_split: float,
        split_seed: int,
        split: str = "train",
        image_size=DEFAULT_IMAGE_SIZE,
    ):
        _check_split(split)
        if not 0.0 <= test_split < 1.0:
            raise DataError(f"test_split must be in [0, 1), not {test_split}")
        good = list_images(require_dir(Path(good_dir), "good image folder", "pass the folder of good images"))
        if good_test_dir is not None:
            train, held_out = (
                good,
                list_images(
                    require_dir(Path(good_test_dir), "good test folder", "pass a folder of good test images or leave it out")
                ),
            )
        else:
            kept, held = seeded_split(len(good), int(round(test_split * len(good))), split_seed)
            train, held_out = [good[i] for i in kept], [good[i] for i in held]
        has_masks = mask_dir is not None
        if split == "train":
            records = [Record(p, 0, GOOD) for p in train]
        else:
            records = [Record(p, 0, GOOD) for p in held_out]
            for folder in map(Path, defect_dirs):
                for img in list_images(require_dir(folder, "defect folder", "pass existing folders of defective images")):
                    records.append(Record(img, 1, folder.name, self._mask_for(img, folder, mask_dir) if has_masks else None))
        name = f"{split} split of {good_dir}" + (
            f" and {', '.join(map(str, defect_dirs))}" if split == "test" and defect_dirs else ""
        )
        super().__init__(records, has_masks, image_size, name=name)
        self.siblings = [Path(p) for p in held_out] if split == "train" and good_test_dir is None else []

    @staticmethod
    def _mask_for(img: Path, folder: Path, mask_dir: str | Path) -> Path:
        mask_dir = require_dir(Path(mask_dir), "mask folder", "pass the folder of defect masks or leave it out")
        for candidate_dir in (mask_dir / folder.name, mask_dir):
            mask = find_mask(candidate_dir, img.stem)
            if mask is not None and mask != img:
                return mask
        raise DataError(
            f"{img}: no mask {img.stem}_mask.png in {mask_dir / folder.name} or {mask_dir}; add the mask or remove the image"
        )


class NaturalImages(Dataset):
    """Any folder tree of photos (searched recursively): the negatives of the fine-tuning.

    Items are (3, H, W) tensors in [0, 1] resized to ``image_size`` (a square side or an
    exact ``(height, width)``), or whatever ``transform`` makes of the RGB ``PIL.Image``.
    """

    def __init__(self, root: str | Path, image_size=DEFAULT_IMAGE_SIZE, transform: Callable | None = None):
        root = require_dir(Path(root), "natural image folder", "pass a folder of photos (e.g. ImageNet samples)")
        self.paths = list_images(root, recursive=True)
        if not self.paths:
            raise DataError(f"{root} holds no images: add photos ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.size_hw = input_size(image_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        img = read_image(self.paths[index])
        return self.transform(img) if self.transform is not None else image_to_tensor(img, self.size_hw)
