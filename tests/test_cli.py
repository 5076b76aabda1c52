import json
import subprocess
import sys

import yaml
from click.testing import CliRunner

from anomatune.cli import app
from anomatune.demo import build_dataset


def _cli(*args):
    """Run the real entry point, as a user would."""
    return subprocess.run([sys.executable, "-c", "from anomatune.cli import main; main()", *args], capture_output=True, text=True)


def test_help_lists_every_option_with_defaults():
    result = CliRunner().invoke(app, ["fit", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--backbone", "--layers", "--image-size", "--proj-dim", "--device", "--seed"):
        assert option in result.output
    assert "default: glad" in result.output and "default: auto" in result.output


def test_fit_evaluate_end_to_end(tmp_path):
    data = build_dataset(tmp_path / "data", n_train=8, n_good_test=4, n_defect=2, crop=64)
    run = tmp_path / "run"
    fitted = _cli("fit", "--data", str(data), "--category", "brick", "--model", "padim", "--image-size", "64",
                  "--proj-dim", "16", "--proj", "pca", "--device", "cpu", "--out", str(run))
    assert fitted.returncode == 0, fitted.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["backbone"] == "efficientnet_lite0" and config["weights_id"].startswith("sha256:")
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "detector.safetensors", "projection.safetensors"}
    evaluated = _cli("evaluate", str(run), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["aupro"] <= 1 and metrics["n_test"] == 10
    assert {"roc.png", "pro.png", "heatmaps.png", "metrics.md"} <= {p.name for p in run.iterdir()}

    config["run_format"] = 99
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    stale = _cli("evaluate", str(run))
    assert stale.returncode == 2 and "run format 99" in stale.stderr and "Traceback" not in stale.stderr
    config["run_format"], config["weights_id"] = 1, "sha256:0000"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    other = _cli("evaluate", str(run))
    assert other.returncode == 2 and "fitted with backbone weights sha256:0000" in other.stderr


def test_user_errors_are_one_line(tmp_path):
    result = _cli("fit", "--data", str(tmp_path / "missing"), "--category", "x", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("anomatune: error: dataset root")
    assert "Traceback" not in result.stderr
    result = _cli("evaluate", str(tmp_path))
    assert result.returncode == 2 and "is not a run folder" in result.stderr


def test_finetune_help_lists_every_setting_with_its_default():
    from anomatune.finetune.settings import setting_fields

    result = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for name, _, _, _ in setting_fields():
        assert "--" + name.replace("_", "-") in result.output
    assert "--dry-run" in result.output and "--resume" in result.output and "[default: threshold]" in result.output


def test_color_transfer_draws_the_figure(tmp_path):
    from skimage import data
    from PIL import Image

    Image.fromarray(data.astronaut()).save(tmp_path / "source.png")
    Image.fromarray(data.camera()).save(tmp_path / "grey.png")
    result = _cli("color-transfer", str(tmp_path / "source.png"), str(tmp_path / "grey.png"), "--rho", "0.5", "0.75", "1",
                  "--out", str(tmp_path / "fig.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "fig.png").size[0] > Image.open(tmp_path / "fig.png").size[1]  # 2 rows x 5 columns
    bad = _cli("color-transfer", str(tmp_path / "source.png"), str(tmp_path / "grey.png"), "--rho", "2", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "rho" in bad.stderr


def test_finetune_dry_run_from_the_command_line(tmp_path):
    data = build_dataset(tmp_path / "data", n_train=6, n_good_test=1, n_defect=1, crop=64)
    from anomatune.demo import write_negatives

    photos = write_negatives(tmp_path / "photos")
    result = _cli("finetune", "--data", str(data), "--category", "brick", "--negatives", str(photos), "--out", str(tmp_path / "ft"),
                  "--image-size", "64", "--proj-dim", "8", "--n-components", "2", "--diag-images", "2", "--dry-run", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "negative patches" in result.stdout and (tmp_path / "ft" / "dry_run_weights.png").is_file()
    assert not (tmp_path / "ft" / "backbone.safetensors").exists()
