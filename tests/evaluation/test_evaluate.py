"""Evaluating a run: the evaluation/ folder written as one set, strict JSON, the figures."""

import json
import shutil

import pytest
import yaml

from anomatune import evaluate
from anomatune.data import DataSettings
from anomatune.errors import DataError
from anomatune.folders.kinds import RunFolder
from tests.conftest import rewrite, served


@pytest.fixture
def run(fast_run, tmp_path):
    return shutil.copytree(fast_run, tmp_path / "run")


def test_evaluate_writes_metrics_and_figures(run):
    result = evaluate(run, device="cpu")
    folder = RunFolder(served(run)).evaluation
    names = {p.name for p in folder.path.iterdir()}
    assert {"metrics.json", "metrics.md", "roc.png", "pro.png", "heatmaps.png", "gallery.json", "gallery"} <= names
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["n_test"] == 10 and 0 <= metrics["image_auroc"] <= 1 and metrics["input_size"] == [32, 32]
    assert 0 <= result["f1_at_learnt_threshold"] <= result["f1_tuned_on_test"] <= 1
    gallery = json.loads((folder / "gallery.json").read_text())
    assert gallery["threshold"] == pytest.approx(metrics["learnt_threshold"], rel=1e-3)
    assert all((folder / e["image"]).is_file() for e in gallery["entries"])


def test_a_metric_that_does_not_apply_is_null(run, brick):
    evaluate(run, DataSettings(good=str(brick / "brick" / "test" / "good"), test_split=0.5), figures=False, device="cpu")
    metrics = json.loads(
        (served(run) / "evaluation" / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")
    )
    assert metrics["image_auroc"] is None and metrics["aupro"] is None and metrics["n_test"] == 2
    assert not (served(run) / "evaluation" / "roc.png").exists()  # the evaluation is one set: the earlier figures are gone


def test_a_run_without_its_data_asks_for_it(run):
    config = yaml.safe_load((served(run) / "config.yaml").read_text())
    config["data"] = None  # fitted on a dataset built in Python
    rewrite(served(run) / "config.yaml", yaml.safe_dump(config))
    with pytest.raises(DataError, match="does not record its data .*pass the test data"):
        evaluate(run, device="cpu")
