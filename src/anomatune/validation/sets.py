"""A validation set made from good images only (plus, when the user has some, a few real defects).

A seeded share of the good training images is held out. The validation set is those
images as they are, then the same images with one synthetic anomaly each, for every
family of :mod:`.synthetic` (severities spread from subtle to obvious), then any real
defective images the user gives (``--validation-defects``). Nothing here reads a test
split. The set is deterministic from its seed, and cached in a folder (the run's, the
fine-tuning's) so that it is built once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import AnomalyDataset, NaturalImages, Record, collate, find_mask, seeded_split
from ..data.images import list_images
from ..errors import DataError
from ..folders.base import VALIDATION, Folder
from .settings import FAMILIES, ValidationSettings
from .synthetic import synthesize

log = logging.getLogger(__name__)

GOOD, REAL = "good", "real"
PHOTOS = 64  # photos loaded for the texture family at most
CACHE_FORMAT = 1


def validation_split(n: int, share: float, seed: int, max_held: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` good images: (kept to fit on, held out for validation); when holding out at all, at least
    2 of each and at most ``max_held`` held out."""
    n_held = 0 if share == 0 or n < 4 else min(max(2, round(share * n)), n - 2, max_held)
    return seeded_split(n, n_held, seed)


def load_images(dataset, batch_size: int = 16, desc: str = "load images") -> torch.Tensor:
    """Every image of a dataset (already at its input size) in one ``(N, 3, H, W)`` tensor."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return torch.cat([batch["image"] for batch in tqdm(loader, desc=desc, leave=False)])


def real_defects(folder: str | Path, size_hw: tuple[int, int]) -> AnomalyDataset:
    """A folder of real defective images, with ``<stem>_mask.*`` masks beside them when there are (all or none)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder of defective images (--validation-defects): pass an existing folder")
    images = [p for p in list_images(root) if not p.stem.endswith("_mask")]
    if not images:
        raise DataError(f"{root} holds no images: put a few defective images there (masks as <stem>_mask.png)")
    masks = [find_mask(root, p.stem) for p in images]
    masks = [m if m is not None and m != p else None for m, p in zip(masks, images)]
    has_masks = all(m is not None for m in masks)
    if any(m is not None for m in masks) and not has_masks:
        missing = next(p for p, m in zip(images, masks) if m is None)
        raise DataError(f"{missing}: no mask {missing.stem}_mask.png beside it; give a mask for every image or for none")
    records = [Record(p, 1, REAL, m if has_masks else None) for p, m in zip(images, masks)]
    return AnomalyDataset(records, has_masks, name=f"validation defects in {root}").at_size(size_hw)


def load_photos(folder: str | Path, size_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """Up to ``PHOTOS`` photos of a folder (a seeded choice), at the input size: the texture family's source."""
    photos = NaturalImages(folder, image_size=size_hw)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(photos), generator=generator)[:PHOTOS].tolist()
    return torch.stack([photos[i] for i in chosen])


def validation_set(
    cache: Folder | None,
    good: torch.Tensor,
    settings: ValidationSettings,
    seed: int,
    held: Sequence,
    photo_seed: int | None = None,
) -> tuple[ValidationSet, str, bool]:
    """The validation set of the held-out ``good`` images (at their input size): read from ``cache`` when it was
    built there with the same recipe, else built (photos drawn with ``photo_seed``, default ``seed``).

    ``held`` names the held-out images (paths or indices) in the cache key. Returns the set, its key (to cache
    it with :meth:`ValidationSet.save`) and whether it came from the cache."""
    size = tuple(good.shape[-2:])
    v = settings
    key = ValidationSet.key(held=list(held), size=size, families=v.families, photos=v.photos, defects=v.defects, seed=seed)
    if cache is not None and (cached := ValidationSet.cached(cache, key)) is not None:
        log.info("validation set read from %s", cache.path)
        return cached, key, True
    photos = None if v.photos is None else load_photos(v.photos, size, seed if photo_seed is None else photo_seed)
    real = None if v.defects is None else real_defects(v.defects, size)
    return ValidationSet.build(good, seed, v.families, photos, real), key, False


@dataclass
class ValidationSet:
    """Images ``(N, 3, H, W)``, labels ``(N,)`` (1 = anomalous), masks ``(N, 1, H, W)`` (``None`` rows are
    zero; ``has_masks`` is False for real defects without masks), and each image's group: ``good``, a
    family, or ``real``."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    groups: list[str]
    has_masks: torch.Tensor  # (N,) bool: whether the image's mask is known

    @property
    def families(self) -> list[str]:
        """The anomalous groups, in order."""
        return list(dict.fromkeys(g for g in self.groups if g != GOOD))

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def build(
        cls,
        good: torch.Tensor,
        seed: int,
        families: Sequence[str] = FAMILIES,
        photos: torch.Tensor | None = None,
        real: AnomalyDataset | None = None,
    ) -> ValidationSet:
        """The held-out ``good`` images, then each family's anomalies of them (one generator per family, so that a
        family's images do not depend on which others are built), then the ``real`` defects."""
        images, masks, groups = [good], [torch.zeros(len(good), 1, *good.shape[-2:])], [GOOD] * len(good)
        known = [torch.ones(len(good), dtype=torch.bool)]
        for index, family in enumerate(families):
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            defective, family_masks, _ = synthesize(family, good, generator, photos)
            images.append(defective), masks.append(family_masks), known.append(torch.ones(len(good), dtype=torch.bool))
            groups += [family] * len(good)
        if real is not None:
            loader = DataLoader(real, batch_size=16, collate_fn=collate)
            for batch in loader:
                images.append(batch["image"])
                masks.append(
                    batch["mask"] if batch["mask"] is not None else torch.zeros(len(batch["image"]), 1, *good.shape[-2:])
                )
                known.append(torch.full((len(batch["image"]),), batch["mask"] is not None))
                groups += [REAL] * len(batch["image"])
        labels = torch.tensor([g != GOOD for g in groups], dtype=torch.long)
        in_8_bits = (torch.cat(images) * 255).round() / 255  # as cached: a cached set equals a rebuilt one
        return cls(in_8_bits, labels, torch.cat(masks), groups, torch.cat(known))

    # -- the cache ----------------------------------------------------------------------------

    @staticmethod
    def key(**recipe) -> str:
        """A short hash of everything the set is built from: a cache under another recipe is rebuilt."""
        text = json.dumps({"format": CACHE_FORMAT, **recipe}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, folder: Folder, key: str) -> None:
        """Into ``folder`` as one safetensors file (images in 8 bits: what they were read as)."""
        tensors = {
            "images": (self.images * 255).round().to(torch.uint8),
            "labels": self.labels,
            "masks": self.masks.bool(),
            "has_masks": self.has_masks,
        }
        folder.write_tensors(VALIDATION, tensors, metadata={"key": key, "groups": json.dumps(self.groups)})

    @classmethod
    def cached(cls, folder: Folder, key: str) -> ValidationSet | None:
        """The set cached in ``folder`` under this ``key``, or None."""
        path = folder.path / VALIDATION
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            if metadata.get("key") != key:
                return None
            return cls(
                tensors["images"].float() / 255,
                tensors["labels"],
                tensors["masks"].float(),
                json.loads(metadata["groups"]),
                tensors["has_masks"],
            )
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("%s: unreadable validation cache (%s): rebuilding it", path, exc)
            return None
