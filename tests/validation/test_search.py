"""--detector auto: candidates scored on the validation set, the best refit, its table kept with the run."""

import json

import pytest

from anomatune import Pipeline, open_dataset
from anomatune.errors import AnomatuneError
from anomatune.folders.base import VALIDATION
from anomatune.folders.kinds import RunFolder
from anomatune.pipeline.settings import PipelineSettings
from anomatune.validation import sets
from anomatune.validation.search import CANDIDATES, FINE, Candidate, DetectorSearch
from anomatune.validation.settings import ValidationSettings

from ..conftest import FAST

SMALL_GLAD = (("n_components", 2), ("max_iter", 3))
TWO = (Candidate("padim"), Candidate("glad", "pca", changes=SMALL_GLAD))


def _search(candidates=TWO, **validation) -> DetectorSearch:
    return DetectorSearch(PipelineSettings().updated(**FAST), ValidationSettings(**validation), candidates, device="cpu")


def test_the_best_candidate_on_validation_is_refit_and_its_table_saved(brick, tmp_path):
    train = open_dataset(data=brick, category="brick")
    search = _search().fit(train)
    scores = [row["score"] for row in search.results_]
    assert [row["candidate"] for row in search.results_] == ["padim all default", "glad pca64 default"]
    assert search.best_candidate_ == TWO[scores.index(max(scores))]
    best = search.best_
    assert best.settings.detector.name == search.best_candidate_.detector
    assert best.fit_record_.n_train == 12  # every training image
    assert best.selection_["winner"] == search.best_candidate_.name and "highest validation score" in best.selection_["why"]
    assert set(best.selection_["candidates"][0]["families"]) == set(ValidationSettings().families)
    run = search.save(tmp_path / "run")
    assert (tmp_path / "run" / VALIDATION).is_file()  # in the model folder: a refit of the model finds it
    assert json.loads((run / RunFolder.SELECTION).read_text())["winner"] == best.selection_["winner"]
    assert Pipeline.load(run.path).selection_ == json.loads(json.dumps(best.selection_))
    assert "selection_" not in vars(Pipeline(**FAST).fit(train))  # a plain fit has no table


def test_a_second_search_into_the_same_run_reads_the_cached_validation(brick, tmp_path, monkeypatch):
    train = open_dataset(data=brick, category="brick")
    _search(candidates=TWO[:1]).fit(train).save(tmp_path / "run")

    def rebuilt(*args, **kwargs):
        raise AssertionError("the validation set was built again")

    monkeypatch.setattr(sets.ValidationSet, "build", rebuilt)
    search = DetectorSearch(
        PipelineSettings().updated(**FAST), candidates=TWO[:1], cache=RunFolder(tmp_path / "run"), device="cpu"
    )
    assert search.fit(train).best_candidate_ == TWO[0]
    with pytest.raises(AssertionError, match="built again"):  # another recipe is rebuilt
        DetectorSearch(
            PipelineSettings().updated(**FAST), ValidationSettings(seed=1), TWO[:1], RunFolder(tmp_path / "run"), device="cpu"
        ).fit(train)


def test_the_fine_stages_add_the_stride_4_stage(brick):
    search = _search(candidates=(Candidate("padim", stages=FINE),))
    search.fit(open_dataset(data=brick, category="brick"))
    default = Pipeline(**FAST).fit(open_dataset(data=brick, category="brick")).fit_record_.layers
    assert len(search.best_.fit_record_.layers) == len(default) + 1 and set(default) < set(search.best_.fit_record_.layers)


def test_too_few_images_and_no_candidate_are_one_line_errors(mvtec_tree):
    train = open_dataset(data=mvtec_tree, category="widget")
    with pytest.raises(AnomatuneError, match="too few to hold some out"):
        _search().fit(train.subset([0, 1, 2]))
    with pytest.raises(AnomatuneError, match="at least one candidate"):
        _search(candidates=())


def test_the_default_candidates_cover_every_detector_on_both_stage_sets():
    names = {c.name for c in CANDIDATES}
    assert {"padim all default", "glad pca64 default", "glad all default", "patchcore all default"} <= names
    assert {"padim all fine", "glad pca64 fine", "patchcore all fine"} <= names


def test_search_detectors_and_stages_keep_only_their_candidates_and_refuse_an_unknown_name():
    from anomatune.errors import SettingsError

    default = DetectorSearch().candidates
    assert [c.name for c in default] == ["padim all default", "patchcore all default"]
    search = DetectorSearch(validation=ValidationSettings(detectors="patchcore,padim", stages="fine,default"))
    assert [c.name for c in search.candidates] == [c.name for c in CANDIDATES if c.detector in ("padim", "patchcore")]
    as_the_command_line_gives_them = ValidationSettings(detectors=("patchcore,padim",), families=("scar", "color,blend"))
    assert as_the_command_line_gives_them.detectors == ("patchcore", "padim")
    assert as_the_command_line_gives_them.families == ("scar", "color", "blend")
    with pytest.raises(SettingsError, match="distinct detectors among padim, glad, patchcore, got 'gmm'"):
        ValidationSettings(detectors="gmm")
    with pytest.raises(SettingsError, match="distinct stage sets among default, fine"):
        ValidationSettings(stages="fine,fine")


@pytest.mark.parametrize("aggregation", ["concat", "stage"])
def test_one_backbone_pass_gives_each_stage_set_exactly_its_own_extractors_features(aggregation):
    import torch

    from anomatune.features.extractor import FeatureExtractor
    from anomatune.validation.search import FeatureView, StageMaps, stage_sets

    default = FeatureExtractor(FAST["backbone"], backbone_weights="random").eval()
    sets_ = stage_sets(default)
    union = FeatureExtractor(FAST["backbone"], backbone_weights="random", layers=sets_[FINE]).eval()
    images = torch.rand(5, 3, 48, 40)
    maps = StageMaps(union, torch.split(images, 2), "test")
    for layers in sets_.values():
        alone = FeatureExtractor(FAST["backbone"], backbone_weights="random", layers=layers, aggregation=aggregation).eval()
        with torch.no_grad():
            expected = alone.raw_features(images[[4, 1]])
        got = maps.features(FeatureView(layers, aggregation), rows=[4, 1])
        torch.testing.assert_close(got, expected)
        assert maps.positions(FeatureView(layers, aggregation)) == expected.shape[-2] * expected.shape[-1]


def test_the_final_fit_from_the_searchs_features_equals_a_fit_from_the_images(brick):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from anomatune.data.datasets import collate

    train = open_dataset(data=brick, category="brick")
    plain = Pipeline(detector="padim", **FAST).fit(train)
    loader = DataLoader(train.at_size(plain.input_size), batch_size=5, collate_fn=collate)
    with torch.no_grad():
        raw = torch.cat([plain.extractor_.raw_features(batch["image"]) for batch in loader])
    given = Pipeline(detector="padim", **FAST).fit(train, raw_features=raw)
    assert given.threshold == pytest.approx(plain.threshold, rel=1e-5)
    test = sorted(str(p) for p in (brick / "brick" / "test").rglob("*.png"))
    np.testing.assert_allclose(given.predict(test).scores, plain.predict(test).scores, rtol=1e-5)
    with pytest.raises(AnomatuneError, match="do not fit 12 images"):
        Pipeline(detector="padim", **FAST).fit(train, raw_features=raw[:3])


def test_a_budget_skips_the_candidates_it_cannot_afford_and_says_so(brick):
    search = _search(budget=1e-6).fit(open_dataset(data=brick, category="brick"))  # the first always runs
    assert [row["candidate"] for row in search.results_] == ["padim all default"]
    assert [s["candidate"] for s in search.best_.selection_["skipped"]] == ["glad pca64 default"]
    assert search.best_.selection_["skipped"][0]["estimated_seconds"] >= 0


def test_patchcore_candidates_read_its_own_aggregation():
    from anomatune.validation.search import CANDIDATES

    base = PipelineSettings()
    layers = {"default": (2, 3), FINE: (1, 2, 3)}
    aggregations = {c.detector: c.settings(base, layers).features.aggregation for c in CANDIDATES}
    assert aggregations == {"patchcore": "stage", "padim": "concat", "glad": "concat"}


def test_the_cost_estimates_rank_the_candidates_as_measured():
    from anomatune.models.settings import detector_settings
    from anomatune.validation.search import SEARCH_CORESET, SEARCH_EM

    padim, patchcore = detector_settings("padim"), detector_settings("patchcore", **dict(SEARCH_CORESET))
    glad = detector_settings("glad", **dict(SEARCH_EM))
    assert padim.work(2, 3, 4, 5) == 3 * 2 * 2 * (4 + 5 + 2)
    # transistor at 256 px: 183 images fitted on, 210 validation images, 1,024 positions (benchmarks: 10 s, 49 s, 167 s, 20 s)
    work = [d.work(dim, 1024, 183, 210) for d, dim in ((padim, 152), (glad, 64), (glad, 152), (patchcore, 152))]
    assert work[0] < work[3] < work[1] < work[2]
