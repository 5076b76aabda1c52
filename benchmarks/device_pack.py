"""A copy of the development data small enough to travel to a lent GPU machine, which cannot reach ``../shared``.

Each category's images are written at the size the pipeline reads them at (``size_for(--image-size)``, so the
pipeline's own resize is then the identity) as lossy WebP (or JPEG), masks at the same size as PNG; the natural photos
(fine-tuning negatives) at a short side of ``--photo-side``. Rows measured on such a copy say so: the lossy format
changes the pixels, the same for the frozen and the fine-tuned rows of a comparison. WebP at quality 75 is about half
the bytes of JPEG at 70: all six categories then travel in one call (the limit is 64 MiB). It costs the frozen
detectors, though: PaDiM on transistor scores 0.938 on such a copy against 0.985 on the originals (0.981 on JPEG at
85, `finetune_gpu.md`); where the numbers must match the originals', send fewer categories per call at a higher
quality.

    python benchmarks/device_pack.py --out ../.devdata --photos 300 --photo-side 128   # what finetune_backbone.md was measured on
    python benchmarks/device_pack.py --out ../.devC --datasets transistor kolektorsdd1 loco_juice_bottle_logical elpv_mono \
        --photos 500 --photo-side 128 --format jpeg --quality 85   # what finetune_gpu.md was measured on
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from anomatune import open_dataset
from anomatune.data.images import IMAGE_EXTENSIONS
from common import DATASETS, SHARED


def write_category(root: Path, category: str, out: Path, image_size: int, fmt: str, quality: int) -> int:
    """Every image of the category at its dataset's input size, masks beside them; the bytes written."""
    size_hw = open_dataset(data=root, category=category, split="train").size_for(image_size)
    written = 0
    for path in sorted((root / category).rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        target = out / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            if "ground_truth" in path.parts:
                image.convert("L").resize(size_hw[::-1], Image.NEAREST).save(target.with_suffix(".png"), optimize=True)
                written += target.with_suffix(".png").stat().st_size
            else:
                image.convert("RGB").resize(size_hw[::-1], Image.BICUBIC).save(target.with_suffix(f".{fmt}"), quality=quality)
                written += target.with_suffix(f".{fmt}").stat().st_size
    return written


def write_photos(folder: Path, out: Path, side: int, fmt: str, quality: int, limit: int | None) -> int:
    """The first ``limit`` natural photos with their short side at ``side``; the bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file())[:limit]:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = side / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            target = out / f"{path.stem}.{fmt}"
            image.save(target, quality=quality)
            written += target.stat().st_size
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--image-size", type=int, default=256, help="the pipeline's short side (default 256)")
    parser.add_argument("--photo-side", type=int, default=160, help="short side of the natural photos (default 160)")
    parser.add_argument("--photos", type=int, default=None, help="natural photos per folder (default: all)")
    parser.add_argument("--format", default="webp", choices=["webp", "jpeg"], help="image format (default webp)")
    parser.add_argument("--quality", type=int, default=75, help="the format's quality, 1-100 (default 75)")
    args = parser.parse_args()
    for name in args.datasets:
        root, category = DATASETS[name]
        written = write_category(root, category, args.out / root.name, args.image_size, args.format, args.quality)
        print(f"{name}: {written / 2**20:.1f} MiB", flush=True)
    for folder in ("imagenet_samples", "imagen") if args.photos != 0 else ():
        written = write_photos(
            SHARED / "natural" / folder, args.out / "natural" / folder, args.photo_side, args.format, args.quality, args.photos
        )
        print(f"natural/{folder}: {written / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
