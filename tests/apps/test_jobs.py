"""--category all: a folder per category, one summary table, a failing category reported and the others done."""

import csv
import json

import numpy as np
import pytest

from anomatune.apps.jobs import Job, attempt, summary_columns, with_category_weights, write_summary
from anomatune.data.layouts import list_categories
from anomatune.data.settings import DataSettings
from anomatune.errors import DataError
from anomatune.pipeline.settings import PipelineSettings, RuntimeSettings

from ..conftest import save_image, served
from .test_cli import FAST_OPTIONS, cli


def read_summary(folder) -> dict[str, dict]:
    with open(folder / "summary.csv", newline="") as f:
        return {row["category"]: row for row in csv.DictReader(f)}


def test_list_categories(two_categories, tmp_path):
    assert list_categories(DataSettings(data=str(two_categories))) == ["brick", "broken", "widget"]
    with pytest.raises(DataError, match="--category all needs --data ROOT"):
        list_categories(DataSettings(good=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no categories"):
        list_categories(DataSettings(data=str(tmp_path / "empty")))


def test_fit_all_then_evaluate_all_reports_the_failing_category(two_categories, tmp_path):
    out = tmp_path / "runs"
    code, stdout, err = cli(
        "fit",
        "--data",
        two_categories,
        "--category",
        "all",
        "--detector",
        "padim",
        *FAST_OPTIONS,
        "--out",
        out,
        "--evaluate",
        "--no-figures",
    )
    assert code == 1 and "2 of 3 categories done; failed: broken" in stdout, err
    rows = read_summary(out)
    assert list(rows) == ["brick", "broken", "widget", "mean"]
    assert rows["broken"]["status"] == "failed" and "0.png" in rows["broken"]["error"]
    for category in ("brick", "widget"):
        metrics = json.loads((served(out / category) / "evaluation" / "metrics.json").read_text())
        assert rows[category]["status"] == "ok" and float(rows[category]["image_auroc"]) == metrics["image_auroc"]
    assert float(rows["mean"]["image_auroc"]) == pytest.approx(
        (float(rows["brick"]["image_auroc"]) + float(rows["widget"]["image_auroc"])) / 2, abs=1e-4
    )
    assert "| brick | ok |" in (out / "summary.md").read_text()
    code, stdout, err = cli("evaluate", out, "--category", "all", "--device", "cpu", "--no-figures")
    assert code == 0 and "2 of 2 categories done" in stdout, err  # the runs under out, each on its own data
    assert read_summary(out)["widget"]["image_auroc"] == rows["widget"]["image_auroc"]


def test_engine_options_go_together(tmp_path):
    code, _, err = cli("fit", "--data", tmp_path, "--category", "x", "--engine", "ray", "--out", tmp_path / "r")
    assert code == 2 and "add --category all" in err
    code, _, err = cli("predict", "RUN", "x.png", "--out", tmp_path / "p", "--workers", "2")
    assert code == 2 and "--address and --workers go with --engine ray" in err


def test_a_category_error_is_a_row_and_the_summary_has_a_mean(tmp_path):
    job = Job("evaluate", str(tmp_path), None, runtime=RuntimeSettings())
    row = attempt(job, "missing")
    assert row["status"] == "failed" and "does not exist" in row["error"] and row["seconds"] >= 0
    rows = [
        row,
        {"category": "a", "status": "ok", "image_auroc": 0.9, "seconds": 1.0},
        {"category": "b", "status": "ok", "image_auroc": 0.7, "seconds": 3.0},
    ]
    assert summary_columns(rows) == ["category", "status", "image_auroc", "seconds", "error"]
    write_summary(tmp_path, rows)
    summary = read_summary(tmp_path)
    assert summary["mean"]["image_auroc"] == "0.8" and summary["mean"]["status"] == "2/3 ok"


def test_fine_tuned_weights_per_category(tmp_path):
    (tmp_path / "ft" / "widget").mkdir(parents=True)
    (tmp_path / "ft" / "widget" / "finetune.yaml").write_text("{}")
    settings = PipelineSettings().updated(backbone_weights=str(tmp_path / "ft"))
    assert with_category_weights(settings, "widget").features.backbone_weights == str(tmp_path / "ft" / "widget")
    assert with_category_weights(settings, "other") == settings


def test_a_job_ships_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = PipelineSettings().updated(backbone_weights="ft")
    job = Job(
        "fit", "runs", DataSettings(data="data"), RuntimeSettings(), {"settings": settings, "negatives": "photos"}
    ).absolute()
    assert job.root == str(tmp_path / "runs") and job.data.data == str(tmp_path / "data")
    assert job.options["negatives"] == str(tmp_path / "photos")
    assert job.options["settings"].features.backbone_weights == str(tmp_path / "ft")


def test_finetune_every_category_then_fit_with_each_ones_weights(two_categories, tmp_path):
    photos = tmp_path / "photos"
    for i in range(2):
        save_image(photos / f"{i}.png", size=(50, 40), rng=np.random.default_rng(i))
    code, stdout, err = cli(
        "finetune",
        "--data",
        two_categories,
        "--category",
        "all",
        "--negatives",
        photos,
        "--out",
        tmp_path / "ft",
        *FAST_OPTIONS,
        "--proj-dim",
        "8",
        "--set",
        "n_components=2",
        "--diag-images",
        "2",
        "--mode",
        "adaptor",
        "--steps",
        "1",
        "--batch-neg",
        "2",
    )
    assert code == 1 and "2 of 3 categories done; failed: broken" in stdout, err
    rows = read_summary(tmp_path / "ft")
    assert rows["widget"]["kept_step"] in ("0", "1") and rows["widget"]["fallback"] in ("True", "False")
    code, stdout, err = cli(
        "fit",
        "--data",
        two_categories,
        "--category",
        "all",
        "--detector",
        "padim",
        *FAST_OPTIONS[:2],
        "--backbone-weights",
        tmp_path / "ft",
        *FAST_OPTIONS[4:],
        "--out",
        tmp_path / "runs",
    )
    assert code == 1 and "2 of 3 categories done" in stdout, err
    config = (served(tmp_path / "runs" / "widget") / "config.yaml").read_text()
    assert str(tmp_path / "ft" / "widget") in config
