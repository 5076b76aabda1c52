import logging

import numpy as np
import pytest
import torch
from PIL import Image

from anomatune.data import Folder, MVTecAD, NaturalImages, collate, read_image, read_mask
from anomatune.errors import DataError

from .conftest import save_image, shared_path


# --- real data -----------------------------------------------------------------


def test_transistor_counts_and_masks():
    root = shared_path("mvtec")
    train = MVTecAD(root, "transistor", "train")
    test = MVTecAD(root, "transistor", "test")
    assert len(train) == 213
    assert len(test) == 100
    assert int(test.labels.sum()) == 40
    assert sum(r.mask_path is not None for r in test.records) == 40
    item = test[int(np.argmax(test.labels))]
    assert item["image"].shape == (3, 256, 256) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 256, 256) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["mask"].sum() > 0 and item["label"] == 1
    good = test[int(np.argmin(test.labels))]
    assert good["label"] == 0 and good["mask"].sum() == 0


def test_magnetic_tile_variable_sizes_are_resized():
    root = shared_path("mtd")
    train = MVTecAD(root, "magnetic_tile", "train")
    assert len(train) == 761
    sizes = {Image.open(r.path).size for r in train.records[:50]}
    assert len(sizes) > 1  # the raw data really varies in size
    batch = collate([train[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 256, 256)
    test = MVTecAD(root, "magnetic_tile", "test", image_size=(128, 192))
    item = test[len(test) - 1]
    assert item["image"].shape == (3, 128, 192) and item["mask"].shape == (1, 128, 192)


def test_natural_images_recursive():
    natural = NaturalImages(shared_path("natural"))
    assert len(natural) == 2000
    assert natural[0].shape == (3, 256, 256)


# --- synthetic: layouts and conversions ---------------------------------------------


def test_mvtec_layout_items(mvtec_tree):
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=64)
    assert len(test) == 4 and test.labels.tolist() == [0, 0, 1, 1]
    batch = collate([test[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["mask"].shape == (4, 1, 64, 64)
    assert batch["mask"][:2].sum() == 0 and batch["mask"][2:].sum() > 0
    assert batch["defect_type"] == ["good", "good", "scratch", "scratch"]


def test_without_ground_truth_masks_are_none(mvtec_tree):
    import shutil

    shutil.rmtree(mvtec_tree / "widget" / "ground_truth")
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=32)
    assert test[3]["mask"] is None
    assert collate([test[0], test[3]])["mask"] is None


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_any_mode_reads_as_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(path)
    else:
        Image.new(mode, (8, 6)).save(path)
    img = read_image(path)
    assert img.mode == "RGB" and img.size == (8, 6)
    if mode == "I;16":
        assert np.asarray(img).min() == 255  # full 16-bit range maps onto full 8-bit range


def test_masks_01_and_antialiased_are_binarised(tmp_path):
    arr = np.zeros((6, 8), np.uint8)
    arr[2:4, 2:4] = 1
    Image.fromarray(arr).save(tmp_path / "m01.png")
    assert read_mask(tmp_path / "m01.png").sum() == 4  # not erased by the > 127 threshold
    arr[2:4, 2:4] = 200
    arr[0, 0] = 100
    Image.fromarray(arr).save(tmp_path / "grey.png")
    assert read_mask(tmp_path / "grey.png").sum() == 4


def test_mask_of_other_scale_is_resized_other_aspect_fails(mvtec_tree):
    gt = mvtec_tree / "widget" / "ground_truth" / "scratch"
    Image.fromarray(np.full((60, 80), 255, np.uint8)).save(gt / "000_mask.png")  # 2x scale: fine
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=32)
    assert test[2]["mask"].mean() == 1.0
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(gt / "000_mask.png")  # square mask, 4:3 image
    with pytest.raises(DataError, match="000_mask.png: mask is 30x30 but its image 000.png is 40x30"):
        test[2]


def test_folder_split_is_seeded_and_disjoint(tmp_path):
    for i in range(10):
        save_image(tmp_path / "good" / f"{i}.png")
    save_image(tmp_path / "bad" / "x.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(tmp_path / "masks" / "x_mask.png")
    train = Folder(tmp_path / "good", split="train", test_split=0.3, seed=1)
    test = Folder(tmp_path / "good", [tmp_path / "bad"], mask_dir=tmp_path / "masks", split="test", test_split=0.3, seed=1)
    assert len(train) == 7 and len(test) == 4
    assert not {r.path for r in train.records} & {r.path for r in test.records}
    assert test.labels.tolist() == [0, 0, 0, 1] and test[3]["mask"].mean() == 1.0
    again = Folder(tmp_path / "good", split="train", test_split=0.3, seed=1)
    assert [r.path for r in again.records] == [r.path for r in train.records]


# --- synthetic: bad input gives one clear line -------------------------------------


def test_missing_root_category_split(tmp_path, mvtec_tree):
    with pytest.raises(DataError, match="dataset root .*nowhere does not exist"):
        MVTecAD(tmp_path / "nowhere", "widget")
    with pytest.raises(DataError, match="category 'gadget' not found .*available are widget"):
        MVTecAD(mvtec_tree, "gadget")
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        MVTecAD(mvtec_tree, "widget", "val")
    import shutil

    shutil.rmtree(mvtec_tree / "widget" / "test")
    with pytest.raises(DataError, match="test split .*widget/test does not exist"):
        MVTecAD(mvtec_tree, "widget", "test")


def test_empty_split(tmp_path):
    (tmp_path / "c" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        MVTecAD(tmp_path, "c", "train")
    with pytest.raises(DataError, match="holds no images"):
        NaturalImages(tmp_path)


def test_truncated_and_unreadable_images(mvtec_tree):
    bad = mvtec_tree / "widget" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    train = MVTecAD(mvtec_tree, "widget", "train")
    with pytest.raises(DataError, match=r"001.png: cannot read image .*replace or remove the file"):
        train[1]
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"001.png: cannot read image"):
        train[1]


def test_defect_without_mask_and_mask_without_defect(mvtec_tree):
    gt = mvtec_tree / "widget" / "ground_truth" / "scratch"
    (gt / "001_mask.png").rename(gt / "007_mask.png")
    with pytest.raises(DataError, match=r"001.png: no mask .*001_mask.png; add the mask or remove the image"):
        MVTecAD(mvtec_tree, "widget", "test")
    save_image(mvtec_tree / "widget" / "test" / "scratch" / "001.png")
    (gt / "001_mask.png").write_bytes((gt / "007_mask.png").read_bytes())
    with pytest.raises(DataError, match=r"007_mask.png: mask without an image"):
        MVTecAD(mvtec_tree, "widget", "test")


def test_non_image_files_are_ignored_and_logged_once(mvtec_tree, caplog):
    (mvtec_tree / "widget" / "train" / "good" / "notes.txt").write_text("hello")
    (mvtec_tree / "widget" / "train" / "good" / "Thumbs.db").write_text("x")
    with caplog.at_level(logging.WARNING, logger="anomatune.data"):
        train = MVTecAD(mvtec_tree, "widget", "train")
    assert len(train) == 4
    assert sum("ignored 2 non-image file(s)" in r.message for r in caplog.records) == 1


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="normal image folder .*absent does not exist"):
        Folder(tmp_path / "absent")
    save_image(tmp_path / "good" / "0.png")
    save_image(tmp_path / "bad" / "x.png")
    with pytest.raises(DataError, match=r"x.png: no mask x_mask.png"):
        Folder(tmp_path / "good", [tmp_path / "bad"], mask_dir=tmp_path / "good", split="test")
    with pytest.raises(DataError, match="test_split must be in"):
        Folder(tmp_path / "good", test_split=1.5)


def test_images_are_float_in_unit_range(mvtec_tree):
    item = MVTecAD(mvtec_tree, "widget", "train", image_size=16)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
