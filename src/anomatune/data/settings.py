"""Where the images come from: one settings group for every layout (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..schema import Settings, setting

ALL_CATEGORIES = "all"  # --category all: every category of the root
DEFAULT_IMAGE_SIZE = 256
INPUT_SIDES = (16, 8192)  # the smallest and largest input side in pixels
MAX_PIXELS = 64_000_000  # an image's pixel budget (--max-pixels): its cost stays under 3 GB (benchmarks/results/limits.md)
PILLOW_PIXELS = 178_956_970  # Pillow refuses more as a decompression bomb (2 x Image.MAX_IMAGE_PIXELS)


def parse_image_size(value) -> str:
    """``256`` (short side) or ``"320x256"`` (width x height) in canonical text form; ``ValueError`` otherwise."""
    text = str(value).strip().lower().replace(" ", "")
    parts = text.split("x")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        parts = [str(v) for v in value]
    if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
        raise ValueError(f"expected a short side like 256 or a size WxH like 320x256, got {value!r}")
    low, high = INPUT_SIDES
    if any(not low <= int(p) <= high for p in parts):
        raise ValueError(f"each side must be {low} to {high} px, got {value!r}")
    return "x".join(str(int(p)) for p in parts)


@dataclass(frozen=True)
class DataSettings(Settings):
    """The images of a command: your own folders, or a category of a dataset root.

    The layout is detected from what is given (see ``anomatune.data.layouts``).
    """

    section = "data"
    data: str | None = setting(
        None,
        "Dataset root: an MVTec AD root (with --category), one MVTec AD category folder, "
        "or a VisA root holding split_csv/1cls.csv (with --category).",
        metavar="DIR",
    )
    category: str | None = setting(
        None,
        "Category under --data, e.g. transistor; 'all': every category, each in its own "
        "folder under --out, then a summary table (fit, finetune, evaluate).",
    )
    good: str | None = setting(None, "Your own folder of good images (instead of --data).", metavar="DIR")
    good_test: str | None = setting(
        None, "Folder of good test images for --good; default: a --test-split share of --good.", metavar="DIR"
    )
    defect: tuple[str, ...] = setting(
        (), "Folder of defective test images for --good (repeat for several; the folder name is the defect type).", metavar="DIR"
    )
    masks: str | None = setting(
        None,
        "Folder of defect masks for the --defect images: <stem>_mask.png or <stem>.png, "
        "directly or in a subfolder named like the defect folder.",
        metavar="DIR",
    )
    test_split: float = setting(
        0.2, "Share of --good held out (seeded) as good test images when --good-test is not given.", interval="[0, 1)"
    )
    split_seed: int = setting(0, "Seed of the --test-split draw; keep it between fit, finetune and evaluate.")

    def check(self) -> list[str]:
        if self.good and self.data:
            return ["pass either --good (your own folders) or --data (a dataset root), not both"]
        if not self.good and (self.good_test or self.defect or self.masks):
            return ["--good-test, --defect and --masks go with --good"]
        if (
            self.category and not self.data and self.category != ALL_CATEGORIES
        ):  # evaluate RUNS --category all: each run's own data
            return ["--category goes with --data"]
        return []

    @property
    def given(self) -> bool:
        return bool(self.good or self.data)

    @property
    def folders(self) -> list[str]:
        """Every folder the data is read from (a category's folder under a root; the root for every category):
        where no output may go."""
        data = self.data
        if data and self.category and self.category != ALL_CATEGORIES and (Path(data) / self.category).is_dir():
            data = str(Path(data) / self.category)
        return [f for f in (data, self.good, self.good_test, self.masks, *self.defect) if f]
