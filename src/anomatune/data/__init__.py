"""Images, masks and datasets: the MVTec AD and VisA layouts, your own folders, natural photos.

``open_dataset(DataSettings(...), split)`` detects the layout; the dataset classes are
there for direct use. ``images`` reads files (EXIF orientation, odd modes, masks) and
sets the input size; ``color`` maps a photo's colours onto a product image's.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for editors and type checkers (imported on first use at run time)
    from .datasets import AnomalyDataset, Folder, MVTecAD, NaturalImages, Record, VisA, collate
    from .images import image_to_tensor, list_images, read_image, read_mask
    from .layouts import detect_layout, open_dataset
    from .settings import DataSettings


_EXPORTS = {
    "DataSettings": "settings",
    "open_dataset": "layouts",
    "detect_layout": "layouts",
    "AnomalyDataset": "datasets",
    "MVTecAD": "datasets",
    "VisA": "datasets",
    "Folder": "datasets",
    "NaturalImages": "datasets",
    "Record": "datasets",
    "collate": "datasets",
    "read_image": "images",
    "read_mask": "images",
    "image_to_tensor": "images",
    "list_images": "images",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
