"""Settings: coercion, validation, YAML round trips, flat names, and every default spelled once."""

from dataclasses import fields

import pytest

from anomatune.apps.settings import ColorTransferSettings, DemoSettings
from anomatune.data.settings import DataSettings
from anomatune.errors import SettingsError
from anomatune.features.settings import FeatureSettings
from anomatune.finetune.settings import FinetuneSettings
from anomatune.inference.settings import ExportSettings, PredictSettings
from anomatune.models.settings import DetectorSettings, GLADSettings, detector_settings
from anomatune.pipeline.settings import PipelineSettings, RuntimeSettings, ThresholdSettings
from anomatune.schema import Interval, flat_settings

ALL = [
    DataSettings,
    FeatureSettings,
    PipelineSettings,
    RuntimeSettings,
    FinetuneSettings,
    PredictSettings,
    ExportSettings,
    ColorTransferSettings,
    DemoSettings,
    *DetectorSettings.registry.values(),
]


def test_strings_from_the_command_line_are_coerced():
    settings = FeatureSettings(pool="5", proj_dim="16", layers="1,2", image_size="320 x 256")
    assert (settings.pool, settings.proj_dim, settings.layers, settings.image_size) == (5, 16, (1, 2), "320x256")
    assert FeatureSettings(proj_dim="none").proj_dim is None
    assert GLADSettings(normalize="false").normalize is False and GLADSettings(n_components=8.0).n_components == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pool": "three"}, "features.pool: expected a whole number, got 'three'"),
        ({"pool": 4}, "pool must be odd"),
        ({"pool": 0}, r"features.pool: must be in \[1, 31\], not 0"),
        ({"image_size": 0}, "features.image_size: each side must be 16 to 8192 px"),
        ({"image_size": "big"}, "expected a short side like 256 or a size WxH"),
        ({"proj": "svd"}, "features.proj: must be one of auto, none, random, pca, not 'svd'"),
    ],
)
def test_bad_values_are_one_line_naming_the_setting(kwargs, message):
    with pytest.raises(SettingsError, match=message) as error:
        FeatureSettings(**kwargs)
    assert "\n" not in str(error.value)


def test_nan_and_infinite_numbers_are_refused():
    with pytest.raises(SettingsError, match="finite"):
        ThresholdSettings(quantile=float("nan"))
    with pytest.raises(SettingsError, match="finite"):
        PredictSettings(threshold="nan")
    with pytest.raises(SettingsError, match="finite"):
        FinetuneSettings(lr="inf")


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as error:
        FinetuneSettings(lr=-0.001, steps=0)
    assert "finetune.lr: must be in (0, 1]" in str(error.value) and "finetune.steps" in str(error.value)


def test_yaml_round_trip_and_strict_keys():
    settings = PipelineSettings().updated(detector="padim", image_size="320x256", threshold_quantile=0.995, seed=3)
    again = PipelineSettings.from_dict(settings.to_dict())
    assert again == settings and again.detector.name == "padim" and again.features.image_size == "320x256"
    with pytest.raises(SettingsError, match=r"run.yaml: unknown setting features.poool: choose from"):
        PipelineSettings.from_dict({"features": {"poool": 3}}, source="run.yaml")
    with pytest.raises(SettingsError, match=r"missing features.pool.*incomplete"):
        data = settings.to_dict()
        del data["features"]["pool"]
        PipelineSettings.from_dict(data, complete=True)
    with pytest.raises(SettingsError, match="expected a mapping of features"):
        PipelineSettings.from_dict({"features": 3})


def test_detectors_are_chosen_by_name_and_refuse_other_settings():
    assert detector_settings("gmm", n_components=4).n_components == 4
    assert detector_settings({"name": "patchcore", "coreset_ratio": "0.01"}).coreset_ratio == 0.01
    with pytest.raises(SettingsError, match="unknown detector 'svm': use one of gmm, glad, padim, patchcore"):
        PipelineSettings().updated(detector="svm")
    with pytest.raises(SettingsError, match="unknown setting detector.bogus: choose from ridge, normalize"):
        detector_settings({"name": "padim", "bogus": 1})
    with pytest.raises(SettingsError, match="detector.ridge: expected a number, got 'x'"):
        detector_settings("padim", ridge="x")


def test_flat_names_are_unique_and_reach_nested_groups():
    keys = [flat.key for flat in flat_settings(PipelineSettings)]
    assert len(keys) == len(set(keys)) and {
        "image_size",
        "detector",
        "sigma",
        "threshold_folds",
        "false_alarm_rate",
        "seed",
    } <= set(keys)
    assert PipelineSettings().updated(sigma=2).postprocess.sigma == 2.0
    finetune = FinetuneSettings()
    assert finetune.features.proj_dim == 32 and finetune.guide.name == "gmm" and finetune.guide.n_components == 16
    assert {flat.key: flat.default for flat in flat_settings(FinetuneSettings)}[
        "proj_dim"
    ] == 32  # the defaults shown are the group's own
    with pytest.raises(SettingsError, match="unknown setting 'imagesize'"):
        PipelineSettings().updated(imagesize=3)


def test_settings_are_immutable():
    with pytest.raises(AttributeError):
        FeatureSettings().pool = 5


def test_every_setting_has_help_and_its_default_is_valid():
    for cls in ALL:
        cls()  # the defaults pass their own validation
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_intervals():
    assert (
        0 in Interval("[0, 1)") and 1 not in Interval("[0, 1)") and 0 not in Interval("(0, inf)") and 1e9 in Interval("(0, inf)")
    )
