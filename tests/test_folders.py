"""Run folders: atomic writes, whole sets swapped in, foreign folders refused, one writer at a time."""

import json
import math
import subprocess
import sys

import pytest

from anomatune.errors import RunFolderError
from anomatune.folders.kinds import PredictionsFolder, RunFolder


def test_a_set_replaces_the_old_one_whole(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.staged() as stage:
        stage.write_yaml(RunFolder.CONFIG, {"a": 1})
        stage.write_text("stale.txt", "from the first fit")
    with run.staged() as stage:
        stage.write_yaml(RunFolder.CONFIG, {"a": 2})
    assert run.read_yaml(RunFolder.CONFIG) == {"a": 2} and not (run / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name or ".old-" in p.name] == []
    assert oct((run / RunFolder.CONFIG).stat().st_mode & 0o777) != "0o600"  # the usual mode, not the temporary file's


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunFolder(tmp_path / "new").staged() as stage:
            stage.write_text(RunFolder.CONFIG, "half")
            raise ZeroDivisionError
    assert not (tmp_path / "new").exists()  # no empty --out left behind
    run = RunFolder(tmp_path / "old")
    with run.staged() as stage:
        stage.write_text(RunFolder.CONFIG, "kept")
    with pytest.raises(ZeroDivisionError):
        with run.staged() as stage:
            raise ZeroDivisionError
    assert (run / RunFolder.CONFIG).read_text() == "kept"


def test_foreign_and_other_kinds_of_folder_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="holds files anomatune did not write: choose another folder"):
        with RunFolder(tmp_path / "mine").staged():
            pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    predictions = PredictionsFolder(tmp_path / "preds")
    with predictions.staged() as stage:
        stage.write_text(PredictionsFolder.RESULTS, "path\n")
    with pytest.raises(RunFolderError, match="holds a predictions"):
        with RunFolder(predictions.path).staged():
            pass
    with pytest.raises(RunFolderError, match="holds a predictions: pass a folder written by 'anomatune fit'"):
        RunFolder(predictions.path).require()
    with pytest.raises(RunFolderError, match="does not exist: pass a folder written by 'anomatune fit'"):
        RunFolder(tmp_path / "nothing").require()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom anomatune.folders.kinds import RunFolder\n"
            f"with RunFolder({str(target)!r}).lock():\n    print('held', flush=True)\n    time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="is being written by another anomatune command"):
            with RunFolder(target).staged():
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(target).staged() as stage:  # free again once the holder is gone
        stage.write_text(RunFolder.CONFIG, "ok")


def test_json_is_strict_nan_becomes_null(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_json("m.json", {"aupro": math.nan, "image_auroc": 0.9, "nested": [math.inf]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "aupro": None,
        "image_auroc": 0.9,
        "nested": [None],
    }


def test_damaged_files_are_one_line(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_tensors("t.safetensors", {})
    (tmp_path / "t.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(RunFolderError, match="t.safetensors: cannot read the tensors .*truncated or damaged"):
        folder.read_tensors("t.safetensors")
    (tmp_path / "bad.yaml").write_text("a: [1,")
    with pytest.raises(RunFolderError, match="bad.yaml: not valid YAML"):
        folder.read_yaml("bad.yaml")
    with pytest.raises(RunFolderError, match="missing.json is missing"):
        folder.read_json("missing.json")
