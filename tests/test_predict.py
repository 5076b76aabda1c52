"""Prediction: the learnt threshold, results.csv, PNGs, bad files skipped, exit codes, F1 metrics."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from anomatune.errors import AnomatuneError
from anomatune.metrics import f1_at, f1_optimal_threshold
from anomatune.inference import predict
from anomatune.runs import evaluate, fit

from .conftest import save_image


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from anomatune.demo import build_dataset

    root = tmp_path_factory.mktemp("predict")
    data = build_dataset(root / "data", n_train=10, n_good_test=3, n_defect=2, crop=64)
    fit(data, "brick", root / "run", model="padim", image_size=64, proj_dim=16, proj="pca")
    return root, data


def test_fit_learns_a_threshold_from_held_out_good_images(fitted):
    root, _ = fitted
    config = yaml.safe_load((root / "run" / "config.yaml").read_text())
    threshold = config["threshold"]
    assert threshold["holdout_images"] == 1 and threshold["quantile"] == 0.99
    assert config["data"]["n_train"] == 9
    assert threshold["value"] > threshold["good_map_median"]


def test_predict_writes_scores_decisions_overlays_and_masks(fitted, tmp_path):
    root, data = fitted
    test_dir = data / "brick" / "test"
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    wide = save_image(tmp_path / "in" / "wide.png", size=(90, 50))
    results = predict(root / "run", [test_dir, broken, wide], tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == len(results) == len(list(test_dir.rglob("*.png"))) + 2
    by_name = {r["path"]: r for r in rows}
    assert by_name[str(broken)]["decision"] == "error" and "broken.png" in by_name[str(broken)]["error"]
    scored = [r for r in rows if r["decision"] != "error"]
    assert len(scored) == len(rows) - 1
    for r in scored:
        assert (float(r["score"]) > float(r["threshold"])) == (r["decision"] == "defective")
        mask = np.asarray(Image.open(tmp_path / "out" / r["mask"]))
        assert mask.any() == (r["decision"] == "defective")  # the mask and the decision agree
    wide_row = by_name[str(wide)]
    assert Image.open(tmp_path / "out" / wide_row["overlay"]).size == (90, 50)  # drawn at the image's own size
    assert Image.open(tmp_path / "out" / wide_row["mask"]).size == (90, 50)


def test_threshold_override_and_cli_exit_code(fitted, tmp_path):
    root, data = fitted
    good = data / "brick" / "test" / "good"
    all_defective = predict(root / "run", [good], tmp_path / "low", threshold=-1e9)
    assert all(r.decision == "defective" for r in all_defective)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    cli = [sys.executable, "-c", "from anomatune.cli import main; main()", "predict", str(root / "run"), str(good), str(bad),
           "--out", str(tmp_path / "cli"), "--device", "cpu"]
    result = subprocess.run(cli, capture_output=True, text=True)
    assert result.returncode == 1 and "1 failed" in result.stdout
    missing = subprocess.run(cli[:5] + [str(tmp_path / "nowhere")] + cli[7:], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_a_run_without_threshold_asks_for_one(fitted, tmp_path):
    _, data = fitted
    fit(data, "brick", tmp_path / "run", model="padim", image_size=64, proj_dim=16, proj="pca", threshold_holdout=0)
    with pytest.raises(AnomatuneError, match="--threshold"):
        predict(tmp_path / "run", [data / "brick" / "test" / "good"], tmp_path / "out")


def test_evaluate_reports_learnt_and_test_tuned_f1(fitted):
    root, _ = fitted
    metrics = evaluate(root / "run", figures=False)
    assert 0 <= metrics["f1_at_learnt_threshold"] <= metrics["f1_tuned_on_test"] <= 1
    assert metrics["learnt_threshold"] == pytest.approx(yaml.safe_load((root / "run" / "config.yaml").read_text())["threshold"]["value"], rel=1e-3)


def test_f1_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.9])
    assert f1_at(labels, scores, 0.5) == pytest.approx(2 * 2 / (3 + 3))  # tp 2, 3 predicted, 3 true
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert f1 == pytest.approx(2 * 3 / (3 + 4)) and threshold == pytest.approx(0.1)  # everything above 0.1: tp 3, 4 predicted


def test_report_is_one_page_that_loads_every_image_in_chromium(fitted, tmp_path):
    import re
    import shutil

    from anomatune.report import build_report

    root, _ = fitted
    evaluate(root / "run")
    page = build_report(root / "run", tmp_path / "report.html")
    text = page.read_text()
    assert "<h2>Metrics</h2>" in text and ("false positive" in text or "highest score" in text)
    assert 'src="gallery' not in text and text.count("data:image/png;base64,") >= 3  # self-contained
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium when apt-get can): the page was not rendered")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "chromium returned no page"
    images = int(re.search(r'data-images="(\d+)"', body.group(1)).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', body.group(1)).group(1))
    assert images == text.count("<img") and images >= 3 and broken == 0


@pytest.mark.parametrize("model", ["glad", "patchcore"])
def test_exported_models_match_eager_on_real_images(model, tmp_path):
    """ONNX (onnxruntime) and TorchScript against the eager pipeline, on scikit-image's brick photo crops."""
    import json

    import onnxruntime
    import torch

    from anomatune.data import image_to_tensor, read_image
    from anomatune.demo import build_dataset
    from anomatune.deploy import export
    from anomatune.runs import load_run

    data = build_dataset(tmp_path / "data", n_train=8, n_good_test=1, n_defect=1, crop=64)
    fit(data, "brick", tmp_path / "run", model=model, image_size=64, detector_settings={"n_components": 4} if model == "glad" else {})
    onnx_path = export(tmp_path / "run", format="onnx", batch_size=2)
    script_path = export(tmp_path / "run", format="torchscript", batch_size=2)
    side = json.loads(onnx_path.with_suffix(".json").read_text())
    assert side["input"]["batch_size"] == 2 and side["threshold"] is not None
    run = load_run(tmp_path / "run")
    images = torch.stack([image_to_tensor(read_image(p), 64) for p in sorted((data / "brick" / "test").rglob("*.png"))[:2]])
    with torch.no_grad():
        maps, scores = run.detector.predict(run.extractor(images), run.image_size, run.config["sigma"])
    normalised = (images - torch.tensor(side["input"]["mean"]).view(1, 3, 1, 1)) / torch.tensor(side["input"]["std"]).view(1, 3, 1, 1)
    onnx_maps, onnx_scores = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"image": normalised.numpy()})
    script_maps, script_scores = torch.jit.load(str(script_path))(normalised)
    scale = max(1.0, maps.abs().max().item())  # relative to the scores' magnitude
    for got_maps, got_scores in ((torch.from_numpy(onnx_maps), torch.from_numpy(onnx_scores)), (script_maps, script_scores)):
        assert (got_maps - maps).abs().max() <= 1e-4 * scale
        assert (got_scores - scores).abs().max() <= 1e-4 * scale
