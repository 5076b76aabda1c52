"""Reading images and masks, and the input size they are resized to.

Odd but usable inputs are fixed and logged once: EXIF orientation (a phone photo is
turned upright), grayscale, palette, RGBA (alpha dropped), 16-bit (scaled by the full
range) and CMYK images become 8-bit RGB; masks stored as 0/1 or as label maps are read
as "non-zero is defective", anti-aliased ones are thresholded at 127. Unusable inputs
raise ``DataError`` naming the file and what to do.

The input size: ``image_size`` is the short side in pixels (the long side follows the
images' aspect ratio) or an exact ``WxH``. Every image of a model is resized to one
input size, so that per-position detectors see one grid; maps and masks are resized
back to each image's own size for the user.
"""

from __future__ import annotations

import logging
import re
import statistics
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .settings import parse_image_size

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MIN_SOURCE_SIDE = 8  # smaller images are broken files or placeholders, not inspection images
EXIF_ORIENTATION = 0x0112

_logged: set[str] = set()


def log_once(key: str, message: str, *args) -> None:
    """Log a fix-up the first time it happens in this process, not once per image."""
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


def input_size(image_size: int | str | tuple[int, int], aspect: float = 1.0) -> tuple[int, int]:
    """``(height, width)`` to resize to: a ``(h, w)`` tuple as is, ``WxH`` exactly, or a short side with ``aspect`` = w / h."""
    if isinstance(image_size, tuple):
        return int(image_size[0]), int(image_size[1])
    parts = [int(p) for p in parse_image_size(image_size).split("x")]
    if len(parts) == 2:
        return parts[1], parts[0]
    side = parts[0]
    return (side, max(side, round(side * aspect))) if aspect >= 1 else (max(side, round(side / aspect)), side)


class ImageTooLarge(DataError):
    """An image over the pixel budget (``max_pixels``), refused from its header before it is decoded."""

    def __init__(self, label: str | Path, pixels: int, max_pixels: int, size: tuple[int, int] | None = None):
        shown = f"{size[0]}x{size[1]} px ({pixels / 1e6:.1f} megapixels)" if size else f"{pixels / 1e6:.1f} megapixels"
        super().__init__(
            f"{label}: {shown} is more than the {max_pixels / 1e6:g} megapixels accepted (--max-pixels); "
            "downscale the image or raise --max-pixels"
        )
        self.pixels, self.max_pixels = pixels, max_pixels


@contextmanager
def open_image(source: str | Path | BinaryIO) -> Iterator[Image.Image]:
    """``Image.open`` without Pillow's DecompressionBombWarning on stderr: the pixel budget is ours (check_pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    with img:
        yield img


def check_pixels(label: str | Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """:class:`ImageTooLarge` when an image of ``size`` (width, height) is over ``max_pixels`` (None: no bound)."""
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise ImageTooLarge(label, size[0] * size[1], max_pixels, size)


def _open(source: Path | BinaryIO, label: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image, turning PIL's many failure modes into one DataError naming ``label``.

    An image over ``max_pixels`` is refused from its header, before its pixels take any memory.
    """
    try:
        with open_image(source) as img:
            check_pixels(label, img.size, max_pixels)
            img.load()  # decoding happens here: truncated files fail now, not later
            return img.copy() if img.getexif().get(EXIF_ORIENTATION, 1) == 1 else _upright(img, label)
    except ImageTooLarge:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{label}: file not found") from exc
    except Image.DecompressionBombError as exc:
        raise _bomb(label, exc, max_pixels) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{label}: cannot read image ({exc}); replace or remove the file") from exc


def _bomb(label: str | Path, exc: Exception, max_pixels: int | None) -> ImageTooLarge:
    """Pillow's own bound against decompression bombs, met before ours: its message gives the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    limit = 2 * Image.MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
    return ImageTooLarge(label, int(found.group(1)) if found else 0, limit)


def header_size(source: Path | BinaryIO, label: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from an image's header alone (a stream is rewound); :class:`ImageTooLarge` over
    ``max_pixels``, :class:`DataError` when it is not an image."""
    try:
        with open_image(source) as img:
            size = img.size
    except Image.DecompressionBombError as exc:
        raise _bomb(label, exc, max_pixels) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{label}: not an image anomatune can read (PNG, JPEG, BMP, TIFF, WebP)") from exc
    finally:
        if not isinstance(source, Path):
            source.seek(0)
    check_pixels(label, size, max_pixels)
    return size


def _upright(img: Image.Image, path: str | Path) -> Image.Image:
    log_once("exif", "EXIF orientation is applied (e.g. %s is turned upright)", path)
    return ImageOps.exif_transpose(img)


def _to_8bit(img: Image.Image, path: str | Path) -> Image.Image:
    """Map 16-bit and float single-channel modes onto 8 bits by their full range."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        log_once(f"16bit:{img.mode}", "16-bit images (mode %s, e.g. %s) are scaled to 8 bits", img.mode, path)
        arr = arr / 65535.0 * 255.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | Path | BinaryIO, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Read any image file as upright 8-bit RGB (grayscale is replicated, alpha dropped).

    ``path`` may also be an open binary stream (an upload), called ``name`` in messages.
    An image of more than ``max_pixels`` is refused (:class:`ImageTooLarge`) before it is decoded.
    """
    source = Path(path) if isinstance(path, (str, Path)) else path
    label = source if isinstance(source, Path) else name or "upload"
    img = _to_8bit(_open(source, label, max_pixels), label)
    if min(img.size) < MIN_SOURCE_SIDE:
        raise DataError(
            f"{label}: the image is {img.width}x{img.height} px, too small to inspect "
            f"(at least {MIN_SOURCE_SIDE} px a side); replace or remove the file"
        )
    if img.mode != "RGB":
        log_once(f"mode:{img.mode}", "%s images (e.g. %s) are converted to RGB", img.mode, label)
        img = img.convert("RGB")
    return img


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as a boolean array at its own size.

    Masks whose values stay below 128 (0/1 masks, label maps with one value per defect)
    are read as "non-zero is defective": thresholding them at 127 would silently erase
    every defect. Other masks are thresholded at 127 (anti-aliased edges).
    """
    path = Path(path)
    img = _to_8bit(_open(path, path), path)
    arr = np.asarray(img if img.mode == "L" else img.convert("L"))
    top = int(arr.max(initial=0))
    if 0 < top < 128:
        log_once("masklow", "masks with values below 128 (0/1 or label maps, e.g. %s) are read as non-zero = defective", path)
        return arr > 0
    if not np.isin(np.unique(arr), (0, 255)).all():
        log_once("maskgrey", "non-binary masks (e.g. %s) are thresholded at 127", path)
    return arr > 127


def unreadable(paths: Iterable[str | Path], max_pixels: int | None = None) -> list[str]:
    """The reason each of ``paths`` cannot be used, from its header and checksums (PNG), without decoding it."""
    problems = []
    for path in paths:
        try:
            with open_image(path) as img:
                check_pixels(path, img.size, max_pixels)
                img.verify()
        except ImageTooLarge as exc:
            problems.append(str(exc))
        except Exception as exc:  # Pillow raises many kinds on a damaged file: each is a reason
            problems.append(f"{path}: cannot read image ({' '.join(str(exc).split())[:120]})")
    return problems


def image_size_of(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image as it will be read (upright), from its header only."""
    try:
        with open_image(path) as img:
            width, height = img.size
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); replace or remove the file") from exc
    return (height, width) if turned else (width, height)


def median_aspect(paths: Iterable[str | Path]) -> float:
    """The median width / height of images: the aspect ratio a model's input size follows."""
    return statistics.median(w / h for w, h in map(image_size_of, paths))


def image_to_tensor(img: Image.Image, size_hw: tuple[int, int]):
    """Resize (bilinear) an RGB image to ``size_hw`` and return a (3, H, W) float tensor in [0, 1]."""
    import torch

    h, w = size_hw
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def mask_to_tensor(mask: np.ndarray, size_hw: tuple[int, int]):
    """Resize a boolean mask with nearest neighbour to a (1, H, W) float tensor of 0/1."""
    import torch

    h, w = size_hw
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
        log_once(f"skip:{folder}", "ignored %d non-image file(s) in %s, e.g. %s", len(others), folder, others[0].name)
    return images


def check_mask_shape(mask_wh: Sequence[int], image_wh: Sequence[int], mask_path: Path, image_path: Path) -> None:
    """A mask of another scale is resized; one of another aspect ratio belongs to another image."""
    (mw, mh), (iw, ih) = mask_wh, image_wh
    if (mw, mh) == (iw, ih):
        return
    if abs(mw / mh - iw / ih) > 0.02 * (iw / ih):
        raise DataError(
            f"{mask_path}: mask is {mw}x{mh} but its image {image_path.name} is {iw}x{ih}; "
            "a mask must cover the image it belongs to"
        )
    log_once("maskscale", "masks of another scale than their image (e.g. %s) are resized", mask_path)
