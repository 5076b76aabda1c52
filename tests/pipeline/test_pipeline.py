"""The pipeline: fit, predict at each image's own size, save and load, and every way a run can be damaged."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anomatune import Pipeline, open_dataset
from anomatune.errors import AnomatuneError, DataError, NotFittedError, RunFolderError, SettingsError
from anomatune.folders.kinds import RunFolder
from anomatune.models import GLADSettings
from anomatune.pipeline.pipeline import RUN_FORMAT

from ..conftest import FAST, save_image, served
from ..data.test_images import phone_jpeg


def test_fit_learns_the_input_size_and_a_threshold_from_good_images(fast_run):
    pipeline = Pipeline.load(fast_run, device="cpu")
    record = pipeline.fit_record_
    assert record.input_size == (32, 32) and record.calibration_images == record.n_train == 12  # every image fits
    assert record.threshold > record.good_map_median and record.weights_id == "random:0"
    assert (
        pipeline.image_calibration.threshold == record.threshold
        and pipeline.pixel_calibration.threshold == record.pixel_threshold
    )
    assert pipeline.data_.category == "brick"


def test_predictions_agree_with_themselves(fast_run, brick):
    pipeline = Pipeline.load(fast_run, device="cpu")
    paths = sorted((brick / "brick" / "test").rglob("*.png"))
    result = pipeline.predict(paths)
    assert len(result) == len(paths) and result.threshold == pipeline.threshold
    assert np.array_equal(result.labels, (result.scores > result.threshold).astype(int))
    assert np.array_equal(result.labels, (result.normalized > 0.5).astype(int))  # the same decision on the common scale
    assert np.all((result.false_alarm_rates > 0) & (result.false_alarm_rates < 1))
    for heat, mask, label in zip(result.maps, result.masks, result.labels):
        assert heat.shape == mask.shape == (64, 64)  # each image's own size, not the 32 px input size
        assert mask.any() == bool(label)
    low = pipeline.predict(paths[:2], threshold=-1e9)
    assert low.labels.tolist() == [1, 1] and all(m.any() for m in low.masks)


def test_images_of_every_kind_give_the_same_scores(fast_run, brick):
    pipeline = Pipeline.load(fast_run, device="cpu")
    path = sorted((brick / "brick" / "test" / "good").iterdir())[0]
    image = Image.open(path).convert("RGB")
    as_tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    scores = [pipeline.predict(x).scores[0] for x in ([path], [image], [np.asarray(image)], as_tensor)]
    assert scores[0] == scores[1] == scores[2] and abs(scores[3] - scores[0]) < 0.05 * abs(scores[0])
    for one in (path, str(path), image, np.asarray(image)):  # a single image, not a list of one
        assert len(pipeline.predict(one)) == 1 and pipeline.predict(one).scores[0] == scores[0]
    with pytest.raises(AnomatuneError, match="expected an image path, a PIL image or an HxW"):
        pipeline.predict([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(AnomatuneError, match="the threshold must be a finite number"):
        pipeline.predict([path], threshold=float("nan"))


def test_a_folder_of_mixed_jpegs_with_odd_names(tmp_path):
    """Your own folder: mixed sizes and orientations, spaces and non-ASCII names, a phone photo turned by EXIF."""
    rng = np.random.default_rng(0)
    good = tmp_path / "bonnes pièces"
    sizes = [(64, 48), (80, 60), (48, 64), (96, 72), (64, 48), (70, 50), (64, 48), (60, 80)]
    for i, size in enumerate(sizes):
        save_image(good / f"pièce n°{i} ✓.jpg", size=size, rng=rng)
    phone = phone_jpeg(tmp_path / "téléphone 1.jpg", size=(64, 48))  # stored landscape, shown portrait
    pipeline = Pipeline(detector={"name": "gmm", "n_components": 2}, device="cpu", **FAST)
    pipeline.fit(open_dataset(good=good, test_split=0))
    assert pipeline.input_size == (32, 43)  # short side 32, the images' median aspect ratio 4:3
    result = pipeline.predict([phone, *sorted(good.iterdir())[:2]])
    assert result.maps[0].shape == result.masks[0].shape == (64, 48)  # upright: the EXIF turn is applied
    assert [m.shape for m in result.maps[1:]] == [(48, 64), (60, 80)]  # (height, width) of pièce n°0 and n°1


def test_save_and_load_give_the_same_predictions(tmp_path, brick):
    fitted = Pipeline(detector=GLADSettings(n_components=2), proj_dim=8, proj="pca", device="cpu", **FAST)
    fitted.fit(open_dataset(data=brick, category="brick"))
    version = fitted.save(tmp_path / "run")
    saved = {"config.yaml", "detector.safetensors", "projection.safetensors", "calibration.json", "version.json"}
    assert {p.name for p in version.path.iterdir()} == saved
    images = sorted((brick / "brick" / "test").rglob("*.png"))[:3]
    loaded = Pipeline.load(tmp_path / "run", device="cpu")
    before, after = fitted.predict(images), loaded.predict(images)
    assert (
        loaded.calibration_ == fitted.calibration_ and len(fitted.calibration_["scores"]) == fitted.fit_record_.calibration_images
    )
    assert np.array_equal(before.scores, after.scores) and all(np.array_equal(a, b) for a, b in zip(before.maps, after.maps))


def test_not_fitted_and_nothing_to_load(tmp_path):
    with pytest.raises(NotFittedError, match="call fit"):
        Pipeline(**FAST).predict([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(RunFolderError, match="does not exist: pass a folder written by 'anomatune fit'"):
        Pipeline.load(tmp_path / "nowhere")


@pytest.fixture
def run_copy(fast_run, tmp_path):
    """The served version's files as a bare run folder, writable and without the digest that would refuse an edit."""
    import shutil

    run = shutil.copytree(served(fast_run), tmp_path / "run")
    (run / RunFolder.VERSION).unlink()
    for path in run.iterdir():
        path.chmod(0o644)
    return run


def _edit(run, change):
    path = run / RunFolder.CONFIG
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(run_format=1), rf"run format 1 \(anomatune .*\); this anomatune .* reads format {RUN_FORMAT}: refit"),
        (
            lambda c: c["settings"]["features"].update(pool="three"),
            r"config.yaml: features.pool: expected a whole number, got 'three'",
        ),
        (lambda c: c["settings"]["features"].pop("pool"), r"config.yaml: missing features.pool: the file is incomplete"),
        (lambda c: c["fitted"].update(threshold="high"), r"config.yaml: fitted.threshold: expected a number, got 'high'"),
        (lambda c: c["settings"].update(colour="red"), r"config.yaml: unknown setting colour: choose from"),
        (
            lambda c: c["fitted"].update(weights_id="sha256:0000"),
            r"fitted with backbone weights sha256:0000, but test_efficientnet now has random:0",
        ),
    ],
)
def test_a_damaged_config_is_one_line(run_copy, change, message):
    _edit(run_copy, change)
    with pytest.raises(AnomatuneError, match=message) as error:
        Pipeline.load(run_copy)
    assert "\n" not in str(error.value)


def test_truncated_or_foreign_detector_state_is_one_line(run_copy):
    path = run_copy / RunFolder.DETECTOR
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunFolderError, match="detector.safetensors: cannot read the tensors .*truncated or damaged: refit"):
        Pipeline.load(run_copy)
    _edit(run_copy, lambda c: c["settings"].update(detector={"name": "padim", "ridge": 0.01, "normalize": True}))
    from safetensors.torch import save_file

    save_file({"means": torch.zeros(2, 2)}, str(path))
    with pytest.raises(AnomatuneError, match="does not fit a padim detector with these settings .*missing count, grid"):
        Pipeline.load(run_copy)


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(SettingsError, match="features.image_size"):
        Pipeline(image_size=0)
    with pytest.raises(SettingsError, match="runtime.batch_size: must be in"):
        Pipeline(batch_size=0)
    with pytest.raises(SettingsError, match="runtime.device: expected auto, cpu"):
        Pipeline(device="gpu")


def test_a_tiny_image_in_the_training_set_is_refused(tmp_path):
    for i in range(4):
        save_image(tmp_path / "good" / f"{i}.png", size=(40, 30))
    save_image(tmp_path / "good" / "dot.png", size=(1, 1))
    with pytest.raises(DataError, match="dot.png: the image is 1x1 px, too small to inspect"):
        Pipeline(detector="padim", device="cpu", **FAST).fit(open_dataset(good=tmp_path / "good", test_split=0))


def test_score_gives_the_test_metrics(fast_run, brick):
    metrics = Pipeline.load(fast_run, device="cpu").score(open_dataset(data=brick, category="brick", split="test"))
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["aupro"] <= 1 and "f1_at_learnt_threshold" in metrics


def test_auto_projection_is_the_detectors_choice_and_saved():
    from anomatune.pipeline.settings import PipelineSettings

    assert Pipeline(detector="glad").settings.features.proj_dim == 64  # the mixtures: PCA-64
    assert Pipeline(detector="padim").settings.features.proj_dim is None  # PaDiM and PatchCore keep every feature
    assert Pipeline(detector="glad", proj_dim=16).settings.features.proj_dim == 16  # the user's dimension wins
    assert Pipeline(PipelineSettings(), detector="glad", proj="random").settings.features.proj_dim is None  # not auto: as given
