"""Shared fixtures: tiny synthetic folders, a fast backbone, and the real data in ../shared (skipped with a reason when absent).

Tests that need the packaged pretrained weights or ../shared are marked ``slow``:
``pytest -m "not slow"`` runs the rest in under a minute on 2 CPU cores. The fast tests
use timm's ``test_efficientnet`` with random weights (drawn from a fixed seed).
"""

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before timm reads it: no test waits on the hub (no internet here)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = {"backbone": "test_efficientnet", "backbone_weights": "random", "image_size": 32}  # tiny, random weights: fast tests


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the checkout")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    """Test inputs drawn with torch.rand are the same every run (the library itself never reseeds)."""
    torch.manual_seed(0)


def served(model: Path) -> Path:
    """The folder of a model's served version (``MODEL/versions/vN``): where evaluate, report and export write."""
    from anomatune.folders.kinds import ModelFolder

    return ModelFolder(model).version().path


def rewrite(path: Path, text: str) -> None:
    """Change a file of a version as if it had been written so (its recorded digest follows): for tests of what a
    damaged or older run says, past the check that refuses a version changed after it was written."""
    import json

    from anomatune.folders.kinds import RunFolder

    path.chmod(0o644)
    path.write_text(text)
    record = path.parent / RunFolder.VERSION
    if record.is_file():
        data = json.loads(record.read_text())
        record.chmod(0o644)
        record.write_text(json.dumps(data | {"digest": RunFolder(path.parent).digest()}))


def save_image(path: Path, size=(40, 30), mode="RGB", value=None, rng=None) -> Path:
    """Write a small random image (width, height) in the given PIL mode."""
    rng = rng or np.random.default_rng(0)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
        Image.fromarray(arr, "RGB").save(path)
    elif mode == "L":
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else np.full((h, w), value, np.uint8)
        Image.fromarray(arr, "L").save(path)
    else:
        Image.new(mode, (w, h)).save(path)
    return path


def save_mask(path: Path, size=(40, 30), box=(10, 5, 20, 15)) -> Path:
    """A 0/255 mask (width, height) with a defective box (x0, y0, x1, y1)."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask, "L").save(path)
    return path


@pytest.fixture
def mvtec_tree(tmp_path):
    """A tiny MVTec-layout category: 6 train, 2 good + 2 defective test images with masks."""
    rng = np.random.default_rng(0)
    cat = tmp_path / "widget"
    for i in range(6):
        save_image(cat / "train" / "good" / f"{i:03d}.png", rng=rng)
    for i in range(2):
        save_image(cat / "test" / "good" / f"{i:03d}.png", rng=rng)
        save_image(cat / "test" / "scratch" / f"{i:03d}.png", rng=rng)
        save_mask(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return tmp_path


@pytest.fixture(scope="session")
def brick(tmp_path_factory) -> Path:
    """The demo's brick dataset (scikit-image texture, synthetic defects with masks), small: MVTec layout root."""
    from anomatune.apps.demo import build_dataset

    return build_dataset(tmp_path_factory.mktemp("brick") / "data", n_train=12, n_good_test=4, n_defect=2, crop=64)


@pytest.fixture(scope="session")
def fast_run(brick, tmp_path_factory) -> Path:
    """A model fitted on the brick data with the fast backbone and PaDiM (with a learnt threshold): one version."""
    from anomatune import Pipeline, open_dataset

    out = tmp_path_factory.mktemp("fast_run") / "run"
    Pipeline(detector="padim", device="cpu", **FAST).fit(open_dataset(data=brick, category="brick")).save(out)
    return out


@pytest.fixture
def two_categories(mvtec_tree, brick):
    """widget (fine) and broken (its only training images are truncated), beside a copy of brick."""
    root = mvtec_tree
    shutil.copytree(brick / "brick", root / "brick")
    broken = root / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "notes").mkdir()  # no train/: not a category
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG of ``width`` x ``height`` that is its header alone (no pixel data): what a decompression bomb looks
    like before it is decoded, made in no time at any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
