"""Shared fixtures: the real data in ../shared (skipped with a reason when absent) and tiny synthetic folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the checkout")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    np.random.seed(0)


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


@pytest.fixture
def mvtec_tree(tmp_path):
    """A tiny MVTec-layout category: 4 train, 2 good + 2 defective test images with masks."""
    cat = tmp_path / "widget"
    for i in range(4):
        save_image(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save_image(cat / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        save_image(cat / "test" / "scratch" / f"{i:03d}.png")
        mask = np.zeros((30, 40), np.uint8)
        mask[5:15, 10:20] = 255
        (cat / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask, "L").save(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    return tmp_path
