"""Which layout a command's data options describe; a wrong one gets one line listing the layouts."""

import pytest

from anomatune.data import DataSettings, open_dataset
from anomatune.data.layouts import detect_layout
from anomatune.errors import DataError, SettingsError

from ..conftest import save_image


def test_each_layout_is_detected_and_stated(mvtec_tree, tmp_path, caplog):
    caplog.set_level("INFO")
    assert detect_layout(DataSettings(data=str(mvtec_tree), category="widget"))[0] == "mvtec"
    layout, explicit = detect_layout(DataSettings(data=str(mvtec_tree / "widget")))  # a category folder itself
    assert layout == "mvtec" and explicit.category == "widget" and explicit.data == str(mvtec_tree)
    assert detect_layout(DataSettings(good=str(mvtec_tree / "widget" / "train" / "good")))[0] == "folder"
    dataset = open_dataset(data=mvtec_tree, category="widget", split="test")
    assert len(dataset) == 4 and dataset.source.data == str(mvtec_tree.resolve())  # absolute: a run finds it from anywhere
    assert any("mvtec layout" in r.message for r in caplog.records)


def test_wrong_layouts_say_which_exist(tmp_path, mvtec_tree):
    with pytest.raises(DataError, match="no images given: the layouts are: --good DIR"):
        open_dataset()
    save_image(tmp_path / "plain" / "a.png")
    with pytest.raises(DataError, match=r"plain is in no known layout: the layouts are: .*MVTec AD.*VisA"):
        open_dataset(data=tmp_path / "plain")
    with pytest.raises(DataError, match="holds several categories: pass --category \\(one of widget\\)"):
        open_dataset(data=mvtec_tree)
    with pytest.raises(SettingsError, match="either --good .* or --data"):
        DataSettings(good="a", data="b")
    with pytest.raises(SettingsError, match="--defect and --masks go with --good"):
        DataSettings(data="b", defect=("c",))


def test_own_folders_with_defects_and_masks(tmp_path):
    for i in range(10):
        save_image(tmp_path / "good" / f"{i}.png")
    save_image(tmp_path / "cracks" / "c1.png")
    save_image(tmp_path / "masks" / "cracks" / "c1_mask.png", mode="L", value=255)
    settings = DataSettings(good=str(tmp_path / "good"), defect=(str(tmp_path / "cracks"),), masks=str(tmp_path / "masks"))
    train, test = open_dataset(settings, "train"), open_dataset(settings, "test")
    assert len(train) == 8 and len(test) == 3 and test.labels.tolist() == [0, 0, 1]
    assert test.at_size((16, 16))[2]["mask"].mean() == 1.0 and test.records[2].defect_type == "cracks"
