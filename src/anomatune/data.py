"""Images, masks and datasets.

Every dataset yields images as float tensors in [0, 1], RGB, resized to ``image_size``;
normalisation belongs to the backbone (``FeatureExtractor`` applies it), so the same
dataset serves any backbone and the colour transfer works on plain RGB. Masks are
``(1, H, W)`` float tensors of 0/1, all zero for good images, or ``None`` when the
dataset has no ground truth.

Odd but usable inputs are fixed and logged once (grayscale, RGBA, palette and 16-bit
images; masks stored as 0/1 or anti-aliased); unusable ones raise ``DataError`` naming
the file and what to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_IMAGE_SIZE = 256
GOOD = "good"

_logged: set[str] = set()


def _log_once(key: str, message: str, *args) -> None:
    """Log a fix-up the first time it happens, not once per image."""
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, turning PIL's many failure modes into one DataError."""
    try:
        with Image.open(path) as img:
            img.load()  # decoding happens here: truncated files fail now, not later
            return img.copy()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); replace or remove the file") from exc


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """Map 16-bit and float single-channel modes onto 8 bits by their full range."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        _log_once(f"16bit:{img.mode}", "16-bit images (mode %s, e.g. %s) are scaled to 8 bits", img.mode, path)
        arr = arr / 65535.0 * 255.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | Path) -> Image.Image:
    """Read any image file as 8-bit RGB (grayscale is replicated, alpha dropped)."""
    path = Path(path)
    img = _to_8bit(_open(path), path)
    if img.mode != "RGB":
        _log_once(f"mode:{img.mode}", "%s images (e.g. %s) are converted to RGB", img.mode, path)
        img = img.convert("RGB")
    return img


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a boolean array at its own size (> 127 is defective).

    Masks stored as 0/1 instead of 0/255 are recognised (thresholding them at 127
    would silently erase every defect); grey levels from anti-aliasing are thresholded.
    """
    path = Path(path)
    img = _to_8bit(_open(path), path)
    if img.mode != "L":
        img = img.convert("L")
    arr = np.asarray(img)
    values = np.unique(arr)
    if values.max(initial=0) == 1:
        _log_once("mask01", "masks stored as 0/1 (e.g. %s) are read as 0/255", path)
        return arr == 1
    if not np.isin(values, (0, 255)).all():
        _log_once("maskgrey", "non-binary masks (e.g. %s) are thresholded at 127", path)
    return arr > 127


def image_to_tensor(img: Image.Image, image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert an RGB image to a (3, H, W) float tensor in [0, 1]."""
    h, w = _size_hw(image_size)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def mask_to_tensor(mask: np.ndarray, image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE) -> torch.Tensor:
    """Resize a boolean mask with nearest neighbour to a (1, H, W) float tensor of 0/1."""
    h, w = _size_hw(image_size)
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127).float().unsqueeze(0)


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of a folder, sorted; other files are skipped and logged once per folder."""
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    files = [p for p in entries if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        _log_once(f"skip:{folder}", "ignored %d non-image file(s) in %s, e.g. %s", len(others), folder, others[0].name)
    return images


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder: {hint}")
    return path


@dataclass(frozen=True)
class Record:
    """One image of a dataset: where it is and what it is."""

    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str
    mask_path: Path | None = None


class AnomalyDataset(Dataset):
    """Base of the labelled datasets: a list of records, loaded lazily.

    Items are dicts with ``image`` (3, H, W), ``label`` (0 good, 1 defective),
    ``defect_type``, ``path`` and ``mask`` ((1, H, W) or ``None`` without ground truth).
    Batch them with ``collate``.
    """

    def __init__(self, records: Sequence[Record], has_masks: bool, image_size: int | Sequence[int], name: str):
        if not records:
            raise DataError(f"{name} holds no images: add image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.records = list(records)
        self.has_masks = has_masks
        self.image_size = _size_hw(image_size)
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        img = read_image(record.path)
        mask = None
        if self.has_masks:
            if record.mask_path is None:
                mask = torch.zeros(1, *self.image_size)
            else:
                raw = read_mask(record.mask_path)
                _check_mask_shape(raw.shape, img.size, record)
                mask = mask_to_tensor(raw, self.image_size)
        return {
            "image": image_to_tensor(img, self.image_size),
            "label": record.label,
            "defect_type": record.defect_type,
            "path": str(record.path),
            "mask": mask,
        }


def _check_mask_shape(mask_hw: tuple[int, int], image_wh: tuple[int, int], record: Record) -> None:
    """A mask of another scale is resized; one of another aspect ratio belongs to another image."""
    (mh, mw), (iw, ih) = mask_hw, image_wh
    if (mh, mw) == (ih, iw):
        return
    if abs(mw / mh - iw / ih) > 0.02 * (iw / ih):
        raise DataError(
            f"{record.mask_path}: mask is {mw}x{mh} but its image {record.path.name} is {iw}x{ih}; "
            "a mask must cover the image it belongs to"
        )
    _log_once("maskscale", "masks of another scale than their image (e.g. %s) are resized", record.mask_path)


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


def _find_mask(folder: Path, stem: str) -> Path | None:
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
        root = _require_dir(Path(root), "dataset root", "pass the folder that holds the category folders")
        category_dir = root / category
        if not category_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"category {category!r} not found in {root}: available are {', '.join(available) or 'none'}")
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', not {split!r}")
        split_dir = _require_dir(category_dir / split, f"{split} split", f"expected the MVTec AD layout {category}/{split}/good/...")
        gt_dir = category_dir / "ground_truth"
        has_masks = gt_dir.is_dir()
        if not has_masks and split == "test":
            _log_once(f"nogt:{category_dir}", "%s has no ground_truth folder: masks are None, pixel metrics will be skipped", category_dir)
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
        self.category = category

    @staticmethod
    def _match_masks(images: list[Path], mask_dir: Path) -> dict[Path, Path]:
        """Pair every defect image with its mask, and every mask with its image."""
        masks = {}
        for img in images:
            mask = _find_mask(mask_dir, img.stem)
            if mask is None:
                raise DataError(f"{img}: no mask {mask_dir / (img.stem + '_mask.png')}; add the mask or remove the image")
            masks[img] = mask
        stems = {img.stem for img in images}
        if mask_dir.is_dir():
            for mask in list_images(mask_dir):
                stem = mask.stem.removesuffix("_mask")
                if stem not in stems:
                    raise DataError(f"{mask}: mask without an image (expected {stem}.* in test/{mask_dir.name}); add the image or remove the mask")
        return masks


class Folder(AnomalyDataset):
    """A user's own folders: good images, optional defective folders and masks.

    ``split="train"`` gives good images; ``split="test"`` gives the held-out good
    images (``test_split`` of ``normal_dir``, seeded, unless ``normal_test_dir`` is
    given) plus every image of ``abnormal_dirs`` (defect type = folder name). Masks are
    looked up in ``mask_dir/<defect folder name>/`` then ``mask_dir/`` as
    ``<stem>_mask.*`` or ``<stem>.*``.
    """

    def __init__(
        self,
        normal_dir: str | Path,
        abnormal_dirs: Sequence[str | Path] = (),
        mask_dir: str | Path | None = None,
        normal_test_dir: str | Path | None = None,
        test_split: float = 0.2,
        seed: int = 0,
        split: str = "train",
        image_size=DEFAULT_IMAGE_SIZE,
    ):
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', not {split!r}")
        if not 0.0 <= test_split < 1.0:
            raise DataError(f"test_split must be in [0, 1), not {test_split}")
        normal = list_images(_require_dir(Path(normal_dir), "normal image folder", "pass the folder of good images"))
        if normal_test_dir is not None:
            train, held_out = normal, list_images(_require_dir(Path(normal_test_dir), "normal test folder", "pass a folder of good test images or leave it out"))
        else:
            order = np.random.default_rng(seed).permutation(len(normal))
            n_test = int(round(test_split * len(normal)))
            held_out = [normal[i] for i in sorted(order[:n_test])]
            train = [normal[i] for i in sorted(order[n_test:])]
        has_masks = mask_dir is not None
        if split == "train":
            records = [Record(p, 0, GOOD) for p in train]
        else:
            records = [Record(p, 0, GOOD) for p in held_out]
            for folder in map(Path, abnormal_dirs):
                for img in list_images(_require_dir(folder, "defect folder", "pass existing folders of defective images")):
                    records.append(Record(img, 1, folder.name, self._mask_for(img, folder, mask_dir) if has_masks else None))
        super().__init__(records, has_masks, image_size, name=f"{split} split of {normal_dir}")

    @staticmethod
    def _mask_for(img: Path, folder: Path, mask_dir: str | Path) -> Path:
        mask_dir = _require_dir(Path(mask_dir), "mask folder", "pass the folder of defect masks or leave it out")
        for candidate_dir in (mask_dir / folder.name, mask_dir):
            mask = _find_mask(candidate_dir, img.stem)
            if mask is not None and mask != img:
                return mask
        raise DataError(f"{img}: no mask {img.stem}_mask.png in {mask_dir / folder.name} or {mask_dir}; add the mask or remove the image")


class NaturalImages(Dataset):
    """Any folder tree of photos (searched recursively): the negatives of the fine-tuning.

    Items are (3, H, W) tensors in [0, 1] resized to ``image_size``, or whatever
    ``transform`` makes of the RGB ``PIL.Image`` when one is given.
    """

    def __init__(self, root: str | Path, image_size=DEFAULT_IMAGE_SIZE, transform: Callable | None = None):
        root = _require_dir(Path(root), "natural image folder", "pass a folder of photos (e.g. ImageNet samples)")
        self.paths = list_images(root, recursive=True)
        if not self.paths:
            raise DataError(f"{root} holds no images: add photos ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.image_size = _size_hw(image_size)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        img = read_image(self.paths[index])
        return self.transform(img) if self.transform is not None else image_to_tensor(img, self.image_size)
