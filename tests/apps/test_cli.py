"""The command line as a user meets it: options from the settings, one-line errors before any work, whole run folders."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from anomatune.apps.cli import app, main
from anomatune.finetune.settings import FinetuneSettings
from anomatune.schema import flat_settings

from ..conftest import FAST, save_image, served
from ..data.test_images import phone_jpeg

FAST_OPTIONS = [
    "--backbone",
    FAST["backbone"],
    "--backbone-weights",
    FAST["backbone_weights"],
    "--image-size",
    "32",
    "--device",
    "cpu",
]


def cli(*args) -> tuple[int, str, str]:
    """Run the real entry point in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["anomatune", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, text: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("anomatune: error") or line.startswith("Error")]
    assert code == 2, err
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err


def test_help_groups_the_options_by_settings_group_and_shows_no_empty_default():
    output = CliRunner().invoke(app, ["fit", "--help"], terminal_width=200).output
    headings = [line.rstrip(":") for line in output.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert {"Data", "Features", "Detector", "Threshold", "Validation", "Options"} <= set(headings)
    assert headings[-1] == "Options" and "[default: none]" not in output
    detector = output.split("\nDetector:")[1].split("\n\n")[0]
    assert "--detector" in detector and "--set" in detector


def test_help_lists_every_option_with_its_default():
    result = CliRunner().invoke(app, ["fit", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in (
        "--detector",
        "--set",
        "--backbone",
        "--layers",
        "--image-size",
        "--proj-dim",
        "--threshold-quantile",
        "--good",
        "--defect",
        "--masks",
        "--data",
        "--category",
        "--device",
        "--seed",
        "--config",
    ):
        assert option in result.output
    detector = result.output.split("\nDetector:")[1].split("\n\n")[0]
    assert "|auto]" in detector and "[default: auto]" in detector  # fit chooses the detector unless told
    assert "[default: 256]" in result.output
    finetune_help = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200).output
    for flat in flat_settings(FinetuneSettings):
        assert "--" + flat.flag in finetune_help
    assert "--dry-run" in finetune_help and "[default: threshold]" in finetune_help and "[default: 32]" in finetune_help


def test_detectors_lists_their_settings():
    code, out, _ = cli("detectors")
    assert code == 0 and "glad:" in out and "floor = 1e-12" in out and "coreset_ratio = 0.1" in out


@pytest.mark.parametrize(
    "args, text",
    [
        (
            ["fit", "--good", ".", "--detector", "glad", "--set", "bogus=1"],
            "unknown setting detector.bogus: choose from n_components",
        ),
        (["fit", "--good", ".", "--detector", "glad", "--set", "ridge=x"], "detector.ridge: expected a number, got 'x'"),
        (["fit", "--good", ".", "--detector", "glad", "--set", "ridge"], "--set expects KEY=VALUE, not 'ridge'"),
        (["fit", "--good", ".", "--set", "ridge=1"], "--set changes a fixed detector's settings: add --detector NAME"),
        (["fit", "--good", ".", "--image-size", "0"], "features.image_size: each side must be 16 to 8192 px"),
        (["fit", "--good", ".", "--batch-size", "0"], "runtime.batch_size: must be in [1, 4096], not 0"),
        (["fit", "--good", ".", "--detector", "svm"], "unknown detector 'svm'"),
        (["fit", "--good", ".", "--data", "."], "pass either --good (your own folders) or --data"),
        (["fit", "--good", ".", "--device", "gpu"], "runtime.device: expected auto, cpu, cuda"),
        (["finetune", "--good", ".", "--negatives", ".", "--lr", "-0.001"], "finetune.lr: must be in (0, 1], not -0.001"),
        (
            ["finetune", "--good", ".", "--negatives", ".", "--guide", "glad", "--set", "floor=2"],
            "detector.floor: must be in (0, 1)",
        ),
        (
            ["finetune", "--good", ".", "--negative-mode", "pasted+glitter"],
            "use one or more of photos, pasted, cutpaste, synthetic, noise",
        ),
        (["predict", "RUN", "x.png", "--threshold", "nan"], "predict.threshold: expected a finite number, got 'nan'"),
        (["export", "RUN", "--batch-size", "0"], "export.batch_size: must be in [1, 4096], not 0"),
        (["export", "RUN", "--format", "tflite"], "export.format: must be one of onnx, torchscript"),
        (["color-transfer", "a.png", "b.png", "--rho", "2"], "each rho must be in [0, 1]"),
    ],
)
def test_bad_settings_are_one_line_before_any_work(tmp_path, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*args, *(["--out", "out"] if args[0] in ("fit", "finetune", "predict") else []))
    one_line_error(code, err, text)
    assert not (tmp_path / "out").exists()


def test_a_bad_config_file_is_one_line(tmp_path):
    (tmp_path / "settings.yaml").write_text("features:\n  pool: three\n")
    one_line_error(
        *cli("fit", "--good", tmp_path, "--config", tmp_path / "settings.yaml", "--out", tmp_path / "r")[::2],
        "features.pool: expected a whole number, got 'three'",
    )
    (tmp_path / "settings.yaml").write_text("detector:\n  name: padim\n  colour: red\n")
    one_line_error(
        *cli("fit", "--good", tmp_path, "--config", tmp_path / "settings.yaml", "--out", tmp_path / "r")[::2],
        "unknown setting detector.colour",
    )


def test_missing_data_and_runs_are_one_line(tmp_path):
    one_line_error(*cli("fit", "--data", tmp_path / "missing", "--category", "x", "--out", tmp_path / "r")[::2], "dataset root")
    one_line_error(*cli("evaluate", tmp_path)[::2], "is empty: pass a folder written by 'anomatune fit'")
    one_line_error(*cli("fit", "--out", tmp_path / "r")[::2], "no images given: the layouts are")


def test_own_folders_fit_evaluate_predict_report_export(own_folders, tmp_path):
    run = tmp_path / "run"
    data = ["--good", own_folders / "good", "--defect", own_folders / "scratched", "--masks", own_folders / "masks"]
    code, out, err = cli("fit", *data, "--detector", "padim", *FAST_OPTIONS, "--out", run)
    assert code == 0, err
    config = yaml.safe_load((served(run) / "config.yaml").read_text())
    assert config["settings"]["detector"]["name"] == "padim" and config["data"]["good"] == str((own_folders / "good").resolve())
    code, out, err = cli("evaluate", run, "--device", "cpu")
    assert code == 0, err
    metrics = json.loads((served(run) / "evaluation" / "metrics.json").read_text())
    assert metrics["n_test"] == 3 + 2 and 0 <= metrics["aupro"] <= 1  # a 20 % share of the 13 good images, then the 2 defects
    assert cli("report", run)[0] == 0 and (served(run) / "report.html").is_file()
    assert cli("export", run, "--format", "torchscript")[0] == 0 and (served(run) / "model.pt").is_file()
    one_line_error(*cli("export", run, "--out", tmp_path / "no such folder" / "m.onnx")[::2], "does not exist: create it")

    code, out, err = cli("fit", *data, "--detector", "padim", *FAST_OPTIONS, "--out", run)  # the same fit: the same version
    assert code == 0 and "as version v1" in out, err
    code, out, err = cli("fit", *data, "--detector", "padim", *FAST_OPTIONS, "--false-alarm-rate", "0.05", "--out", run)
    assert code == 0 and "as version v2, served" in out, err  # another fit: a new version, the first one kept whole
    assert (run / "versions" / "v1" / "evaluation" / "metrics.json").is_file() and (
        run / "versions" / "v1" / "model.pt"
    ).is_file()
    one_line_error(*cli("report", run)[::2], "is not evaluated: run 'anomatune evaluate")


def test_predict_writes_one_set_per_call(fast_run, brick, tmp_path):
    good, scratched = brick / "brick" / "test" / "good", brick / "brick" / "test" / "scratch"
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    wide = save_image(tmp_path / "in" / "wide photo é.png", size=(90, 50))
    phone = phone_jpeg(tmp_path / "in" / "phone.jpg", size=(64, 48))
    out = tmp_path / "predictions"
    code, stdout, err = cli("predict", fast_run, good, broken, wide, phone, "--out", out, "--device", "cpu")
    assert code == 1 and "1 failed" in stdout, err  # a bad file is a row, and the exit code says so
    lines = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("  ")}  # a line per image
    assert "failed: " in lines["broken.png"] and "calibrated" in lines["phone.jpg"] and f"{out}/results.csv" in stdout
    rows = {r["path"]: r for r in __import__("csv").DictReader(open(out / "results.csv", encoding="utf-8"))}
    assert rows[str(broken)]["decision"] == "error" and "broken.png" in rows[str(broken)]["error"]
    for row in (r for r in rows.values() if r["decision"] != "error"):
        assert (float(row["score"]) > float(row["threshold"])) == (row["decision"] == "defective")
        assert np.asarray(Image.open(out / row["mask"])).any() == (row["decision"] == "defective")
    assert Image.open(out / rows[str(wide)]["overlay"]).size == (90, 50)  # drawn at the image's own size
    assert Image.open(out / rows[str(phone)]["mask"]).size == (48, 64)  # upright, as the phone showed it
    first_overlays = {p.name for p in (out / "overlays").iterdir()}

    code, _, err = cli("predict", fast_run, scratched, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert {p.name for p in (out / "overlays").iterdir()} == {"000.png", "001.png"} != first_overlays  # no mix of the two calls
    code, stdout, err = cli(
        "predict", fast_run, "--data", brick, "--category", "brick", "--out", tmp_path / "split", "--device", "cpu"
    )
    assert code == 0 and stdout.splitlines()[-1].startswith("10 images scored"), err  # the test split of a dataset, in any layout
    one_line_error(*cli("predict", fast_run, tmp_path / "nowhere", "--out", tmp_path / "p2")[::2], "does not exist")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    one_line_error(*cli("predict", fast_run, scratched, "--out", tmp_path / "docs")[::2], "holds files anomatune did not write")


def test_a_failed_fit_names_every_bad_file_and_leaves_no_folder(mvtec_tree, tmp_path):
    for name in ("003.png", "005.png"):
        bad = mvtec_tree / "widget" / "train" / "good" / name
        bad.write_bytes(bad.read_bytes()[:100])
    code, _, err = cli("fit", "--data", mvtec_tree, "--category", "widget", *FAST_OPTIONS, "--out", tmp_path / "r")
    one_line_error(code, err, "2 of 6 images cannot be used")
    assert "003.png: cannot read image" in err and "005.png: cannot read image" in err
    assert not (tmp_path / "r").exists()


def test_a_truncated_detector_file_is_one_line(fast_run, tmp_path):
    run = shutil.copytree(fast_run, tmp_path / "run")
    data = (served(run) / "detector.safetensors").read_bytes()
    (served(run) / "detector.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(*cli("evaluate", run)[::2], "its model files changed after the version was written")


def test_the_mvtec_and_config_round_trip(mvtec_tree, tmp_path):
    code, _, err = cli("fit", "--data", mvtec_tree / "widget", "--detector", "padim", *FAST_OPTIONS, "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = cli(
        "fit",
        "--data",
        mvtec_tree / "widget",
        "--config",
        tmp_path / "a",
        "--sigma",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "b",
    )  # a run's config.yaml reproduces its settings
    assert code == 0, err
    a, b = (yaml.safe_load((served(tmp_path / x) / "config.yaml").read_text())["settings"] for x in "ab")
    assert b["detector"] == a["detector"] and b["features"] == a["features"] and b["postprocess"]["sigma"] == 2.0


def test_fit_evaluate_in_one_process_equals_fit_then_evaluate(mvtec_tree, tmp_path):
    fit = ("fit", "--data", mvtec_tree / "widget", "--detector", "padim", *FAST_OPTIONS)
    assert cli(*fit, "--out", tmp_path / "two")[0] == 0 and cli("evaluate", tmp_path / "two", "--no-figures")[0] == 0
    code, out, err = cli(*fit, "--out", tmp_path / "one", "--evaluate", "--no-figures")
    assert code == 0 and "image auroc" in out, err
    one, two = (json.loads((served(tmp_path / x) / "evaluation" / "metrics.json").read_text()) for x in ("one", "two"))
    measured = ("run", "test_images_per_s", "fit_seconds")
    assert {k: v for k, v in one.items() if k not in measured} == {k: v for k, v in two.items() if k not in measured}


def test_finetune_dry_run_from_the_command_line(mvtec_tree, tmp_path):
    photos = tmp_path / "photos"
    for i in range(2):
        save_image(photos / f"{i}.png", size=(50, 40), rng=np.random.default_rng(i))
    code, out, err = cli(
        "finetune",
        "--data",
        mvtec_tree,
        "--category",
        "widget",
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
        "--dry-run",
    )
    assert code == 0, err
    assert "negative patches" in out and (tmp_path / "ft" / "dry_run_weights.png").is_file()
    assert not (tmp_path / "ft" / "backbone.safetensors").exists()


def test_finetune_an_adaptor_with_validation_from_the_command_line(mvtec_tree, tmp_path):
    photos = tmp_path / "photos"
    for i in range(2):
        save_image(photos / f"{i}.png", size=(50, 40), rng=np.random.default_rng(i))
    common = (
        "finetune",
        "--data",
        mvtec_tree,
        "--category",
        "widget",
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
        "2",
        "--checkpoint-every",
        "1",
        "--batch-neg",
        "2",
    )
    code, out, err = cli(
        *common,
        "--negative-mode",
        "cutpaste+noise",
        "--validation-negatives",
        photos,
        "--validator",
        "padim",
        "--out",
        tmp_path / "ft",
    )
    assert code == 0, err
    assert "(step " in out and (tmp_path / "ft" / "backbone_last.safetensors").is_file()
    code, _, err = cli(*common, "--negative-mode", "pasted", "--out", tmp_path / "no-photos")  # pasted negatives need photos
    assert code == 2 and "needs a folder of natural photos: pass --negatives DIR" in err and len(err.strip().splitlines()) == 1


def test_fit_auto_chooses_on_validation_and_the_report_says_why(brick, tmp_path):
    code, out, err = cli("fit", "--data", brick, "--category", "brick", *FAST_OPTIONS, "--out", tmp_path / "run")
    assert code == 0, err  # no --detector: the search
    selection = json.loads((served(tmp_path / "run") / "selection.json").read_text())
    assert [c["candidate"] for c in selection["candidates"]] == ["padim all default", "patchcore all default"]
    assert f"detector: {selection['winner']}, chosen for its highest validation score" in out
    config = yaml.safe_load((served(tmp_path / "run") / "config.yaml").read_text())
    assert config["settings"]["detector"]["name"] == selection["winner"].split()[0]
    assert cli("evaluate", tmp_path / "run", "--no-figures", "--device", "cpu")[0] == 0
    assert cli("report", tmp_path / "run")[0] == 0
    page = (served(tmp_path / "run") / "report.html").read_text()
    assert "How the detector was chosen" in page and f"{selection['winner']} (chosen)" in page
    code, _, err = cli(
        "fit", "--data", brick, "--category", "brick", "--detector", "auto", "--set", "ridge=1", "--out", tmp_path / "x"
    )
    one_line_error(code, err, "--detector auto chooses every detector's settings: drop --set")
    code, _, err = cli(
        "fit", "--data", brick, "--category", "brick", *FAST_OPTIONS, "--search-detectors", "glad", "--search-stages",
        "default,fine", "--out", tmp_path / "glad",
    )  # fmt: skip
    assert code == 0, err
    selection = json.loads((served(tmp_path / "glad") / "selection.json").read_text())
    assert [c["candidate"] for c in selection["candidates"]] == ["glad pca64 default", "glad all default", "glad pca64 fine"]


def test_color_transfer_draws_the_figure(tmp_path):
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "source.png")
    Image.fromarray(data.camera()).save(tmp_path / "grey.png")
    code, _, err = cli(
        "color-transfer",
        tmp_path / "source.png",
        tmp_path / "grey.png",
        "--rho",
        "0.5",
        "0.75",
        "1",
        "--out",
        tmp_path / "fig.png",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "fig.png").size[0] > Image.open(tmp_path / "fig.png").size[1]  # 2 rows x 5 columns


def test_help_and_option_errors_do_not_import_torch():
    probe = (
        "import sys\nfrom anomatune.apps.cli import main\nsys.argv = ['anomatune', 'fit', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip().endswith("False")


def test_the_demo_says_in_one_line_whether_the_fine_tuning_was_kept():
    from anomatune.apps.demo import kept_line

    validation = [{"step": 0, "score": 0.9271}, {"step": 40, "score": 0.9282}]
    kept = kept_line({"fallback": False, "kept_step": 40, "validation": validation})
    assert kept.startswith("fine-tuning: kept step 40 (validation 0.9282 against 0.9271 frozen")
    fell_back = kept_line({"fallback": True, "kept_step": 0, "validation": validation[:1]})
    assert fell_back.startswith("fine-tuning: not kept: no step beat the frozen backbone (0.9271)")
