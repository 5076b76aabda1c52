"""anomatune update: a new version from the old one and new good images, without the old training images."""

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from anomatune import Pipeline, open_dataset
from anomatune.apps.cli import app
from anomatune.errors import AnomatuneError
from anomatune.folders.feedback import FeedbackStore
from anomatune.folders.kinds import ModelFolder
from anomatune.models.registry import create_detector
from anomatune.models.settings import UpdateSettings, detector_settings
from anomatune.pipeline.pipeline import RUN_FORMAT
from anomatune.pipeline.update import DEFECTS, update_run
from tests.apps.test_cli import cli
from tests.conftest import FAST, save_image, served


@pytest.fixture(scope="module")
def split_folders(brick, tmp_path_factory):
    """The brick training images as old/ (8), new/ (4) and both/ (all 12, old ones first by name)."""
    root = tmp_path_factory.mktemp("split")
    images = sorted((brick / "brick" / "train" / "good").glob("*.png"))
    for name in ("old", "new", "both"):
        (root / name).mkdir()
    for i, path in enumerate(images):
        part = "old" if i < 8 else "new"
        shutil.copy(path, root / part / f"{i:03d}.png")
        shutil.copy(path, root / "both" / f"{i:03d}.png")
    return root


def fitted(folder, detector, folds=0, **changes):
    pipeline = Pipeline(detector=detector, device="cpu", threshold_folds=folds, **FAST, **changes)
    return pipeline.fit(open_dataset(good=str(folder), test_split=0.0))


def test_padim_update_equals_a_refit_on_the_union(split_folders):
    updated = fitted(split_folders / "old", "padim").update(open_dataset(good=str(split_folders / "new"), test_split=0.0))
    refit = fitted(split_folders / "both", "padim")
    a, b = updated.detector_.state_dict(), refit.detector_.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-6, msg=key)
    images = open_dataset(good=str(split_folders / "both"), test_split=0.0).at_size(refit.input_size)
    batch = torch.stack([images[i]["image"] for i in range(len(images))])
    torch.testing.assert_close(updated.forward(batch)[1], refit.forward(batch)[1], rtol=1e-6, atol=1e-6)
    assert updated.fit_record_.n_train == refit.fit_record_.n_train == 12


def test_patchcore_update_keeps_what_a_streamed_fit_over_the_union_keeps(split_folders):
    settings = {"coreset_ratio": 1.0, "max_patches": 100}  # of 12 x 16 patches; the bank is the sample, row by row
    old = open_dataset(good=str(split_folders / "old"), test_split=0.0)
    pipeline = Pipeline(detector=detector_settings("patchcore", **settings), device="cpu", threshold_folds=0, **FAST)
    updated = pipeline.fit(old).update(open_dataset(good=str(split_folders / "new"), test_split=0.0))
    refit = Pipeline(detector=detector_settings("patchcore", **settings), device="cpu", threshold_folds=0, **FAST)
    refit.fit(open_dataset(good=str(split_folders / "both"), test_split=0.0))
    assert len(refit.detector_.memory_bank_) == 100
    torch.testing.assert_close(updated.detector_.memory_bank_, refit.detector_.memory_bank_)
    torch.testing.assert_close(updated.detector_.sample_keys_.sort().values, refit.detector_.sample_keys_.sort().values)


def test_patchcore_update_below_the_cap_adds_a_coreset_of_the_new_patches():
    torch.manual_seed(0)
    old, new = torch.randn(6, 8, 4, 4), torch.randn(3, 8, 4, 4)
    detector = create_detector(detector_settings("patchcore", coreset_ratio=0.25)).fit(old)
    before = detector.memory_bank_.clone()
    detector.partial_fit(new, len(old))
    assert len(detector.memory_bank_) == len(before) + int(3 * 16 * 0.25)
    torch.testing.assert_close(detector.memory_bank_[: len(before)], before)  # under the cap every old patch stays
    assert int(detector.n_seen_) == 9 * 16


def test_patchcore_update_extends_the_coreset_from_the_bank_towards_what_is_new():
    from anomatune.models.patchcore import greedy_coreset

    torch.manual_seed(0)
    old = torch.randn(6, 8, 4, 4)
    new = torch.randn(3, 8, 4, 4)
    new[0, :, 0, 0] += 40.0  # one new patch far from everything seen
    detector = create_detector(detector_settings("patchcore", coreset_ratio=0.25, max_patches=100)).fit(old)
    before = detector.memory_bank_.clone()
    detector.partial_fit(new, len(old))
    torch.testing.assert_close(detector.memory_bank_[: len(before)], before)  # the centres stay, even over the cap
    far = new[0, :, 0, 0]
    assert (detector.memory_bank_[len(before)] - far).abs().max() < 1e-5  # the farthest new patch is the first centre
    assert len(detector.sample_keys_) == 100 and int(detector.n_seen_) == 9 * 16
    rows = torch.randn(50, 4)
    picked = greedy_coreset(rows, 5, proj_dim=128, seed=0, chosen=10)
    assert len(picked) == 5 and (picked >= 10).all() and len(set(picked.tolist())) == 5


@pytest.mark.parametrize("name", ["gmm", "glad"])
def test_the_online_em_moves_the_mixture_by_the_weight_of_the_new_images(name):
    torch.manual_seed(0)
    old, new = torch.randn(20, 4, 3, 3), torch.randn(20, 4, 3, 3) + 2.0
    settings = detector_settings(name, n_components=2, normalize=False)
    detector = create_detector(settings).fit(old)
    means = detector.means_.clone()
    frozen = create_detector(settings).fit(old).partial_fit(new, 20, UpdateSettings(new_weight=1e-9))
    torch.testing.assert_close(frozen.means_, means, rtol=1e-6, atol=1e-6)  # a negligible weight changes nothing
    half = detector.partial_fit(new, 20)  # default weight: 20 new of 40 images
    patches = new.permute(0, 2, 3, 1).reshape(-1, 4)
    positions = torch.arange(9).repeat(20)
    gain = half.log_density(patches.double(), positions).mean() - frozen.log_density(patches.double(), positions).mean()
    assert gain > 1.0  # the new images are now likely
    assert half.weights_.sum().item() == pytest.approx(1.0)
    if name == "glad":
        assert torch.allclose(half.position_weights_.sum(1), torch.ones(9, dtype=torch.float64))


def test_a_detector_without_an_update_says_refit():
    from anomatune.errors import AnomatuneError
    from anomatune.models.base import Detector

    class Frozen(Detector):
        Settings = type(detector_settings("padim"))

    detector = Frozen()
    detector.grid_, detector.n_features_ = torch.tensor([2, 2]), torch.tensor(3)
    with pytest.raises(AnomatuneError, match="refit"):
        detector.partial_fit(torch.zeros(2, 3, 2, 2), 4)


def test_the_threshold_is_learnt_again_with_the_new_images_scored_before_they_are_learnt(split_folders):
    pipeline = fitted(split_folders / "old", "padim", folds=4)
    before = list(pipeline.calibration_["files"])
    assert pipeline.fit_record_.calibration_images == len(before) == 8  # every fitted image, scored out of fold
    new = open_dataset(good=str(split_folders / "new"), test_split=0.0)
    expected = pipeline.predict([r.path for r in new.records]).scores  # the parent's scores of the unseen images
    pipeline.update(new)
    files, scores = pipeline.calibration_["files"], pipeline.calibration_["scores"]
    assert files[:8] == before and len(files) == 12 and pipeline.calibration_["folds"][8:] == [4] * 4
    np.testing.assert_allclose(scores[8:], expected, rtol=1e-5)
    assert pipeline.fit_record_.calibration_images == 12 and pipeline.fit_record_.n_train == 12
    assert pipeline.threshold == pipeline.image_calibration.threshold
    assert pipeline.image_calibration.n_images == 12


def test_update_writes_a_version_with_its_lineage_and_learns_feedback_once(split_folders, tmp_path, caplog):
    run = tmp_path / "run"
    fitted(split_folders / "old", "padim").save(run)
    store = FeedbackStore(run)
    new_images = sorted((split_folders / "new").glob("*.png"))
    good = store.add(new_images[0].read_bytes(), ".png", {"verdict": "good", "model": "x", "score": 1.0})
    store.add(new_images[0].read_bytes(), ".png", {"verdict": "good", "model": "x", "score": 1.0})  # the same, twice
    defect = store.add(new_images[1].read_bytes(), ".png", {"verdict": "defect", "model": "x", "score": 9.0})
    assert len(list((store.path / "images").iterdir())) == 2  # each image stored once
    result = CliRunner().invoke(app, ["update", str(run), "--good", str(split_folders / "new"), "--feedback", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    parent = Pipeline.load(run, "v1", device="cpu")
    child = Pipeline.load(run, device="cpu")
    lineage = child.lineage_
    assert child.version_ == "v2" and lineage["parent"] == parent.model_id_ and lineage["feedback_good"] == [good["part"]]
    assert lineage["feedback_defects"] == [defect["part"]]
    assert len(lineage["added_images"]) == 4  # the feedback's good image is one of new/: learnt once
    assert child.fit_record_.n_train == 8 + 4
    assert (served(run) / DEFECTS / (defect["image"].split("/")[1])).is_file()  # kept for validation, not trained on
    assert f"parent {parent.model_id_}" in result.output
    # again: the images and the feedback already learnt are not learnt twice; the defects and ancestors stay
    with pytest.raises(AnomatuneError, match="were all learnt already"):
        update_run(run, split_folders / "new", feedback=True)
    save_image(tmp_path / "newer" / "n.png", size=(32, 32), value=7)
    update_run(run, tmp_path / "newer", feedback=True)
    again = Pipeline.load(run, device="cpu")
    assert again.lineage_["feedback_good"] == [] and again.lineage_["parent"] == child.model_id_
    assert [a["parent"] for a in again.lineage_["ancestors"]] == [parent.model_id_]
    assert (served(run) / DEFECTS / (defect["image"].split("/")[1])).is_file()
    assert again.fit_record_.n_train == 13 and ModelFolder(run).versions() == ["v1", "v2", "v3"]


def test_conflicting_verdicts_are_reconciled_and_a_missing_mask_is_said(split_folders, tmp_path, caplog):
    run = tmp_path / "run"
    fitted(split_folders / "old", "padim").save(run)
    store = FeedbackStore(run)
    image = sorted((split_folders / "new").glob("*.png"))[0].read_bytes()
    for _ in range(3):
        store.add(image, ".png", {"verdict": "good", "model": "x", "score": 1.0})
    last = store.add(image, ".png", {"verdict": "defect", "model": "x", "score": 1.0}, mask_png=b"not used")
    (store.path / last["mask"]).unlink()
    with caplog.at_level("WARNING"):
        result = update_run(run, split_folders / "new", feedback=True)
    assert result["feedback_good"] == [] and result["feedback_defects"] == [last["part"]]  # the last verdict counts
    assert "its mask" in caplog.text and "kept without it" in caplog.text
    with open(store.log_path, "a") as log:
        log.write('{"id": "x", "part": "y", "verdict": "good", "image": "../../../etc/passwd"}\n')
    with pytest.raises(AnomatuneError, match="outside the feedback store"):
        update_run(run, split_folders / "old", feedback=True)


def test_update_without_images_and_on_a_run_from_another_version_is_one_line(split_folders, tmp_path, fast_run):
    run = tmp_path / "run"
    shutil.copytree(fast_run, run)
    code, _, err = cli("update", run)
    assert code == 2 and err.count("\n") == 1 and "no new good images: pass --good DIR or --feedback" in err
    code, _, err = cli("update", run, "--good", tmp_path / "nowhere")
    assert code == 2 and err.count("\n") == 1 and "nowhere does not exist or is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli("update", run, "--good", tmp_path / "empty")
    assert code == 2 and err.count("\n") == 1 and "holds no images" in err
    good_only = tmp_path / "good_only"  # its test split: a share of the good folder, no defect
    Pipeline(detector="padim", device="cpu", **FAST).fit(open_dataset(good=str(split_folders / "old"), test_split=0.25)).save(
        good_only
    )
    code, _, err = cli("update", good_only, "--good", split_folders / "new", "--evaluate", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1 and "nothing to compare the versions on" in err
    config = served(run) / "config.yaml"
    config.chmod(0o644)
    config.write_text(config.read_text().replace(f"run_format: {RUN_FORMAT}", "run_format: 3"))
    code, _, err = cli("update", run, "--good", split_folders / "new")
    assert code == 2 and err.count("\n") == 1 and "refit the run with this version" in err
    assert ModelFolder(run).versions() == ["v1"]


def test_the_report_shows_the_lineage(split_folders, tmp_path):
    from anomatune.inference.report import build_report

    run = tmp_path / "run"
    fitted(split_folders / "old", "padim").save(run)
    update_run(run, split_folders / "new")
    metrics = served(run) / "evaluation"  # the report needs an evaluation; its numbers are not the point here
    metrics.mkdir()
    (metrics / "metrics.json").write_text('{"category": "brick", "detector": "padim", "backbone": "test", "image_auroc": 1.0}')
    page = build_report(run).read_text()
    assert "Lineage (anomatune update)" in page and Pipeline.load(run, "v1", device="cpu").model_id_ in page
    assert load_file(str(served(run) / "detector.safetensors"))["count"].item() == 12


def test_update_learns_the_stores_verdicts_and_imports_the_log_once(split_folders, tmp_path, caplog):
    from anomatune.store import InspectionStore, StoreSettings

    run = tmp_path / "cap"
    fitted(split_folders / "old", "padim").save(run)
    files = FeedbackStore(run)
    images = sorted((split_folders / "new").glob("*.png"))
    first = files.add(images[0].read_bytes(), ".png", {"verdict": "good", "model": "x", "score": 1.0})
    second = files.add(images[1].read_bytes(), ".png", {"verdict": "good", "model": "x", "score": 1.0})
    shared = tmp_path / "line.sqlite"
    line = InspectionStore(shared, station="cell-2")  # another station says the second part is a defect, later
    line.add_feedback(id="b" * 32, model="cap", part=second["part"], verdict="defect", image=second["image"])
    with caplog.at_level("INFO"):
        result = update_run(run, None, feedback=True, inspections=StoreSettings(store=str(shared)))
    assert result["feedback_good"] == [first["part"]] and result["feedback_defects"] == [second["part"]]
    assert "2 verdicts of" in caplog.text  # the log's lines, imported once
    assert line.import_feedback(files.records(), model="cap") == 0
    assert [v["part"] for v in line.verdicts("cap")] == [first["part"], second["part"]]
