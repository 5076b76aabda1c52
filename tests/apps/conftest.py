"""Fixtures of the command-line tests."""

import shutil

import pytest


@pytest.fixture
def own_folders(tmp_path):
    """A user's folders: good brick crops, scratched ones and their masks (names with spaces)."""
    from anomatune.apps.demo import build_dataset

    data = build_dataset(tmp_path / "demo", n_train=10, n_good_test=3, n_defect=2, crop=64)
    root = tmp_path / "my parts"
    shutil.copytree(data / "brick" / "train" / "good", root / "good")
    for i, path in enumerate(sorted((data / "brick" / "test" / "good").iterdir())):
        shutil.copy(path, root / "good" / f"extra {i}.png")
    shutil.copytree(data / "brick" / "test" / "scratch", root / "scratched")
    shutil.copytree(data / "brick" / "ground_truth" / "scratch", root / "masks")
    return root
