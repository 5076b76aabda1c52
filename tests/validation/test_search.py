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
