"""Outputs never overwrite inputs, and every weak case of a hostile user's session is one line."""

import errno
import json
import shutil
import socket
from pathlib import Path

import pytest

import anomatune.inference.export as export

from ..conftest import served
from .test_cli import cli, one_line_error


@pytest.fixture
def run(fast_run, tmp_path) -> Path:
    return Path(shutil.copytree(fast_run, tmp_path / "run"))


def test_export_never_overwrites_the_run_and_checks_the_extension(run, tmp_path):
    before = (served(run) / "config.yaml").read_bytes()
    one_line_error(*cli("export", run, "--out", served(run) / "config.yaml")[::2], "a onnx model is written as .onnx")
    one_line_error(*cli("export", run, "--out", run / "other.onnx")[::2], f"is inside {run}, which this command reads")
    one_line_error(*cli("export", run, "--format", "torchscript", "--out", tmp_path / "m.onnx")[::2], "written as .pt or .pth")
    assert (served(run) / "config.yaml").read_bytes() == before
    one_line_error(*cli("report", run, "--out", served(run) / "config.yaml")[::2], "which this command reads")


def test_predict_never_writes_into_the_run_or_what_it_reads(run, brick, tmp_path):
    scratched = brick / "brick" / "test" / "scratch"
    one_line_error(*cli("predict", run, scratched, "--out", run / "p")[::2], f"is inside {run}")
    one_line_error(*cli("predict", run, scratched, "--out", scratched / "p")[::2], "which this command reads")
    assert not (run / "p").exists() and not (scratched / "p").exists()


def test_fit_never_writes_into_its_data(own_folders, tmp_path):
    good = own_folders / "good"
    one_line_error(*cli("fit", "--good", good, "--out", good / "run")[::2], f"is inside {good.resolve()}")


def test_predict_without_images_scores_the_test_split_the_run_was_fitted_on(run, tmp_path):
    code, stdout, err = cli("predict", run, "--out", tmp_path / "p", "--device", "cpu")
    assert code == 0 and stdout.splitlines()[-1].startswith("10 images scored"), err  # brick's test split: 4 good, 6 defective


def test_a_threshold_from_few_good_images_is_said(own_folders, tmp_path, caplog):
    code, _, err = cli(
        "fit",
        "--good",
        own_folders / "good",
        "--detector",
        "padim",
        "--backbone",
        "test_efficientnet",
        "--backbone-weights",
        "random",
        "--image-size",
        "64",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    assert "good images are few for a 1% false-alarm rate" in caplog.text and "would make it tight" in caplog.text


def test_evaluate_without_defective_images_writes_null_and_says_why(run, brick, tmp_path, caplog):
    good_only = tmp_path / "good_only"
    shutil.copytree(brick / "brick" / "test" / "good", good_only)
    code, stdout, err = cli(
        "evaluate", run, "--good", brick / "brick" / "train" / "good", "--good-test", good_only, "--no-figures"
    )
    assert code == 0, err
    metrics = json.loads((served(run) / "evaluation" / "metrics.json").read_text())
    assert metrics["image_auroc"] is None and metrics["f1_at_learnt_threshold"] is None
    assert "image auroc n/a" in stdout and "F1 needs defective test images" in caplog.text


def test_a_full_disk_is_one_line(run, tmp_path, monkeypatch):
    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export, "atomic_write", full)
    one_line_error(*cli("export", run, "--out", tmp_path / "m.onnx")[::2], "the disk is full")


def test_no_lock_file_stays_behind(run, tmp_path):
    assert cli("predict", run, "--out", tmp_path / "p", "--device", "cpu")[0] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]


def test_serve_refuses_a_taken_port_and_two_runs_of_one_name_before_loading(run, tmp_path):
    twin = shutil.copytree(run, tmp_path / "twin" / "run")
    one_line_error(*cli("serve", run, twin, "--port", "8123")[::2], "several runs are named run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(*cli("serve", run, "--port", port)[::2], f"cannot listen on 127.0.0.1:{port}")
