"""The validation set: the held-out split, its groups, its cache, and real defects from a folder."""

import logging

import pytest
import torch

from anomatune.errors import DataError
from anomatune.folders.base import VALIDATION, Folder
from anomatune.validation.sets import GOOD, REAL, ValidationSet, real_defects, validation_split

from ..conftest import save_image, save_mask


def test_the_split_is_seeded_disjoint_bounded_and_keeps_two_of_each():
    kept, held = validation_split(20, 0.2, seed=3, max_held=30)
    assert len(held) == 4 and sorted(kept + held) == list(range(20))
    assert validation_split(20, 0.2, 3, 30)[1] == held and validation_split(20, 0.2, 4, 30)[1] != held
    assert len(validation_split(200, 0.2, 0, max_held=30)[1]) == 30
    assert len(validation_split(5, 0.01, 0, 30)[1]) == 2 and len(validation_split(5, 0.9, 0, 30)[0]) == 2
    assert validation_split(3, 0.5, 0, 30)[1] == [] and validation_split(20, 0.0, 0, 30)[1] == []


def test_the_set_holds_the_good_images_then_one_anomaly_of_each_family():
    good = torch.rand(3, 3, 32, 32)
    valset = ValidationSet.build(good, seed=0, families=("cutpaste", "color"))
    assert valset.groups == [GOOD] * 3 + ["cutpaste"] * 3 + ["color"] * 3 and valset.families == ["cutpaste", "color"]
    assert valset.labels.tolist() == [0] * 3 + [1] * 6 and valset.has_masks.all()
    assert torch.allclose(valset.images[:3], good, atol=1 / 510) and valset.masks[:3].sum() == 0
    assert (valset.masks[3:].sum((1, 2, 3)) > 0).all()
    alone = ValidationSet.build(good, seed=0, families=("color",))  # a family does not depend on the others built
    assert torch.equal(alone.images[3:], ValidationSet.build(good, seed=0, families=("color",)).images[3:])
    assert torch.equal(alone.images[3:], ValidationSet.build(good, 0, families=("color", "cutpaste")).images[3:6])


def test_the_cache_gives_back_the_same_set_under_the_same_recipe_only(tmp_path, caplog):
    folder = Folder(tmp_path / "run")
    folder.path.mkdir()
    valset = ValidationSet.build(torch.rand(2, 3, 16, 16), seed=1, families=("scar", "deform"))
    key = ValidationSet.key(images=["a.png", "b.png"], seed=1)
    valset.save(folder, key)
    cached = ValidationSet.cached(folder, key)
    assert torch.equal(cached.images, valset.images) and torch.equal(cached.masks, valset.masks)
    assert cached.groups == valset.groups and torch.equal(cached.labels, valset.labels)
    assert ValidationSet.cached(folder, ValidationSet.key(images=["a.png"], seed=1)) is None
    assert folder.kind is None  # a cache alone does not make a folder foreign
    (folder.path / VALIDATION).write_bytes(b"not safetensors")
    with caplog.at_level(logging.WARNING):
        assert ValidationSet.cached(folder, key) is None
    assert "unreadable validation cache" in caplog.text


def test_real_defects_come_with_masks_for_all_or_none(tmp_path):
    defects = tmp_path / "defects"
    for name in ("a", "b"):
        save_image(defects / f"{name}.png")
        save_mask(defects / f"{name}_mask.png")
    found = real_defects(defects, (30, 40))
    assert len(found) == 2 and found.has_masks and found[0]["mask"].sum() > 0
    valset = ValidationSet.build(torch.rand(2, 3, 30, 40), seed=0, families=("cutpaste",), real=found)
    assert valset.groups[-2:] == [REAL, REAL] and valset.has_masks.all() and valset.labels[-2:].tolist() == [1, 1]
    (defects / "b_mask.png").unlink()
    with pytest.raises(DataError, match="b.png: no mask b_mask.png beside it"):
        real_defects(defects, (30, 40))
    (defects / "a_mask.png").unlink()
    assert not real_defects(defects, (30, 40)).has_masks
    with pytest.raises(DataError, match="no such folder"):
        real_defects(tmp_path / "absent", (30, 40))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        real_defects(tmp_path / "empty", (30, 40))
