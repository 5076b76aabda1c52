"""Datasets: the MVTec AD and VisA layouts, your own folders; bad input gives one clear line."""

import csv
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from anomatune.data.datasets import Folder, MVTecAD, NaturalImages, VisA, collate
from anomatune.errors import DataError

from ..conftest import save_image, save_mask, shared_path

# --- real data (slow: ../shared) --------------------------------------------------------------


@pytest.mark.slow
def test_transistor_counts_and_masks():
    root = shared_path("mvtec")
    train = MVTecAD(root, "transistor", "train")
    test = MVTecAD(root, "transistor", "test")
    assert len(train) == 213 and len(test) == 100 and int(test.labels.sum()) == 40
    assert sum(r.mask_path is not None for r in test.records) == 40
    item = test[int(np.argmax(test.labels))]
    assert item["image"].shape == (3, 256, 256) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 256, 256) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["mask"].sum() > 0 and item["label"] == 1


@pytest.mark.slow
def test_magnetic_tile_sizes_vary_and_keep_the_median_aspect_ratio():
    train = MVTecAD(shared_path("mtd"), "magnetic_tile", "train")
    assert len(train) == 761 and len({Image.open(r.path).size for r in train.records[:50]}) > 1
    h, w = train.size_hw
    assert min(h, w) == 256 and abs(w / h - train.aspect) < 0.01
    batch = collate([train.at_size((128, 192))[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 128, 192)


@pytest.mark.slow
def test_wide_categories_keep_their_aspect_ratio():
    train = MVTecAD(shared_path("more"), "kolektorsdd1", "train")
    h, w = train.size_hw
    assert min(h, w) == 256 and max(h, w) > 2 * min(h, w)  # 2.5:1 parts keep their shape


@pytest.mark.slow
def test_natural_images_recursive():
    natural = NaturalImages(shared_path("natural"))
    assert len(natural) == 2000 and natural[0].shape == (3, 256, 256)


# --- synthetic: layouts -----------------------------------------------------------------------


def test_mvtec_layout_items(mvtec_tree):
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=(64, 64))
    assert len(test) == 4 and test.labels.tolist() == [0, 0, 1, 1]
    batch = collate([test[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 1, 64, 64)
    assert batch["mask"][:2].sum() == 0 and batch["mask"][2:].sum() > 0
    assert batch["defect_type"] == ["good", "good", "scratch", "scratch"]
    assert MVTecAD(mvtec_tree, "widget", "test", image_size=30).size_hw == (30, 40)  # 4:3 images, short side 30


def test_without_ground_truth_masks_are_none(mvtec_tree):
    shutil.rmtree(mvtec_tree / "widget" / "ground_truth")
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=32)
    assert test[3]["mask"] is None and collate([test[0], test[3]])["mask"] is None


def test_mask_of_other_scale_is_resized_other_aspect_fails(mvtec_tree):
    gt = mvtec_tree / "widget" / "ground_truth" / "scratch"
    Image.fromarray(np.full((60, 80), 255, np.uint8)).save(gt / "000_mask.png")  # 2x scale: fine
    test = MVTecAD(mvtec_tree, "widget", "test", image_size=32)
    assert test[2]["mask"].mean() == 1.0
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(gt / "000_mask.png")  # square mask, 4:3 image
    with pytest.raises(DataError, match="000_mask.png: mask is 30x30 but its image 000.png is 40x30"):
        test[2]


def test_visa_layout(tmp_path):
    rows = []
    for i in range(4):
        save_image(tmp_path / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG")
        rows.append(["candle", "train" if i < 3 else "test", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""])
    save_image(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "0000.JPG")
    label_map = np.zeros((30, 40), np.uint8)
    label_map[3:9, 3:9] = 2  # VisA masks hold a label per defect
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    Image.fromarray(label_map).save(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0000.png")
    rows.append(["candle", "test", "anomaly", "candle/Data/Images/Anomaly/0000.JPG", "candle/Data/Masks/Anomaly/0000.png"])
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    assert len(VisA(tmp_path, "candle", "train")) == 3
    test = VisA(tmp_path, "candle", "test", image_size=(30, 40))
    assert test.labels.tolist() == [0, 1] and test[1]["mask"].sum() == 36 and test[0]["mask"].sum() == 0
    with pytest.raises(DataError, match="category 'pcb1' not in .*1cls.csv: available are candle"):
        VisA(tmp_path, "pcb1")


def test_folder_split_is_seeded_and_disjoint(tmp_path):
    for i in range(10):
        save_image(tmp_path / "good" / f"{i}.png")
    save_image(tmp_path / "bad" / "x.png")
    save_mask(tmp_path / "masks" / "x_mask.png", box=(0, 0, 40, 30))
    train = Folder(tmp_path / "good", split="train", test_split=0.3, split_seed=1)
    test = Folder(tmp_path / "good", [tmp_path / "bad"], mask_dir=tmp_path / "masks", split="test", test_split=0.3, split_seed=1)
    assert len(train) == 7 and len(test) == 4
    assert not {r.path for r in train.records} & {r.path for r in test.records}
    assert test.labels.tolist() == [0, 0, 0, 1] and test[3]["mask"].mean() == 1.0
    assert [r.path for r in Folder(tmp_path / "good", test_split=0.3, split_seed=1).records] == [r.path for r in train.records]
    assert test.name == f"test split of {tmp_path / 'good'} and {tmp_path / 'bad'}"  # where its images come from


def test_a_broken_image_drawn_into_the_test_split_is_named_at_fit(tmp_path):
    for i in range(10):
        save_image(tmp_path / "good" / f"{i}.png")
    train = Folder(tmp_path / "good", split="train", test_split=0.3, split_seed=1)
    held = sorted(set((tmp_path / "good").iterdir()) - {r.path for r in train.records})[0]
    held.write_bytes(held.read_bytes()[:60])  # truncated
    with pytest.raises(DataError, match=rf"1 of 10 images cannot be used: {held}"):
        Folder(tmp_path / "good", split="train", test_split=0.3, split_seed=1).check_readable()


# --- synthetic: bad input gives one clear line --------------------------------------------------


def test_missing_root_category_split(tmp_path, mvtec_tree):
    with pytest.raises(DataError, match="dataset root .*nowhere does not exist"):
        MVTecAD(tmp_path / "nowhere", "widget")
    with pytest.raises(DataError, match="category 'gadget' not found .*available are widget"):
        MVTecAD(mvtec_tree, "gadget")
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        MVTecAD(mvtec_tree, "widget", "val")
    shutil.rmtree(mvtec_tree / "widget" / "test")
    with pytest.raises(DataError, match="test split .*widget/test does not exist"):
        MVTecAD(mvtec_tree, "widget", "test")


def test_empty_split(tmp_path):
    (tmp_path / "c" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        MVTecAD(tmp_path, "c", "train")
    with pytest.raises(DataError, match="holds no images"):
        NaturalImages(tmp_path)


def test_truncated_image_names_the_file(mvtec_tree):
    bad = mvtec_tree / "widget" / "train" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError, match=r"001.png: cannot read image .*replace or remove the file"):
        MVTecAD(mvtec_tree, "widget", "train", image_size=(32, 32))[1]


def test_defect_without_mask_and_mask_without_defect(mvtec_tree):
    gt = mvtec_tree / "widget" / "ground_truth" / "scratch"
    (gt / "001_mask.png").rename(gt / "007_mask.png")
    with pytest.raises(DataError, match=r"001.png: no mask .*001_mask.png; add the mask or remove the image"):
        MVTecAD(mvtec_tree, "widget", "test")
    (gt / "001_mask.png").write_bytes((gt / "007_mask.png").read_bytes())
    with pytest.raises(DataError, match=r"007_mask.png: mask without an image"):
        MVTecAD(mvtec_tree, "widget", "test")


def test_non_image_files_are_ignored_and_logged_once(mvtec_tree, caplog):
    (mvtec_tree / "widget" / "train" / "good" / "notes.txt").write_text("hello")
    (mvtec_tree / "widget" / "train" / "good" / "Thumbs.db").write_text("x")
    with caplog.at_level(logging.WARNING, logger="anomatune.data"):
        train = MVTecAD(mvtec_tree, "widget", "train")
    assert len(train) == 6
    assert sum("ignored 2 non-image file(s)" in r.message for r in caplog.records) == 1


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="good image folder .*absent does not exist"):
        Folder(tmp_path / "absent", test_split=0.2, split_seed=0)
    save_image(tmp_path / "good" / "0.png")
    save_image(tmp_path / "bad" / "x.png")
    with pytest.raises(DataError, match=r"x.png: no mask x_mask.png"):
        Folder(tmp_path / "good", [tmp_path / "bad"], mask_dir=tmp_path / "good", split="test", test_split=0.2, split_seed=0)


def test_images_are_float_in_unit_range(mvtec_tree):
    item = MVTecAD(mvtec_tree, "widget", "train", image_size=(16, 16))[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 16, 16)
