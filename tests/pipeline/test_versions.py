"""A model folder keeps its versions: fit, update and threshold add one beside the others; promote moves the alias;
prune removes old ones; a kill -9 at any step leaves every earlier version whole and the alias on a complete one."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from anomatune import Pipeline, open_dataset
from anomatune.errors import RunFolderError
from anomatune.folders.kinds import ModelFolder, RunFolder
from anomatune.pipeline.update import threshold_version, update_run
from tests.apps.test_cli import cli
from tests.conftest import FAST, save_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    for i in range(8):
        save_image(root / "old" / f"{i:03d}.png", size=(32, 32), value=100 + i)
    for i in range(3):
        save_image(root / "new" / f"{i:03d}.png", size=(32, 32), value=140 + i)
    return root


def fit(folder: Path, detector: str = "padim") -> Pipeline:
    pipeline = Pipeline(detector=detector, device="cpu", threshold_folds=4, **FAST)
    return pipeline.fit(open_dataset(good=str(folder), test_split=0.0))


def files_of(version: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(version.iterdir()) if p.is_file()}


def test_fit_update_threshold_promote_and_prune_keep_every_version(folders, tmp_path):
    model = tmp_path / "line"
    first = fit(folders / "old").save(model)
    assert first.path == model / "versions" / "v1" and ModelFolder(model).served_name() == "v1"
    v1_files = files_of(first.path)
    again = fit(folders / "old").save(model)  # an identical fit: the same id, no second version
    assert again.path.name == "v1" and ModelFolder(model).versions() == ["v1"]

    result = update_run(model, folders / "new")
    assert result["version"] == "v2" and result["parent_version"] == "v1"
    assert ModelFolder(model).served_name() == "v2" and files_of(first.path) == v1_files  # the parent is untouched
    updated = Pipeline.load(model, device="cpu")
    assert updated.version_ == "v2" and updated.lineage_["parent"] == Pipeline.load(model, "v1").model_id_

    stricter = threshold_version(model, false_alarm_rate=0.002)
    v3 = ModelFolder(model).version("v3")
    assert stricter["version"] == "v3" and Pipeline.load(model).threshold > updated.threshold
    detector = (v3 / "detector.safetensors").stat()
    assert detector.st_ino == (model / "versions" / "v2" / "detector.safetensors").stat().st_ino  # stored once
    assert not os.access(v3 / "config.yaml", os.W_OK) or os.geteuid() == 0  # read-only once written

    code, out, _ = cli("versions", model)
    assert code == 0 and "* v3" in out and "  v1" in out and "update" in out and "threshold" in out
    code, out, _ = cli("promote", model, "v1")  # rollback is one command
    assert code == 0 and Pipeline.load(model, device="cpu").model_id_ == Pipeline.load(model, "v1").model_id_
    code, out, _ = cli("prune", model, "--keep", "1")
    assert code == 0 and ModelFolder(model).versions() == ["v1", "v3"]  # the served one stays whatever --keep says


def test_the_id_is_a_digest_of_what_determines_the_outputs(folders, tmp_path, monkeypatch):
    a = fit(folders / "old").save(tmp_path / "a")
    monkeypatch.chdir(folders)  # the same fit typed from another folder, with a relative path
    b = fit(Path("old")).save(tmp_path / "b")
    assert a.digest() == b.digest()  # two identical fits, in two places, from two working folders
    calibration = Pipeline.load(tmp_path / "b").calibration_["files"]
    assert all(Path(f).is_absolute() for f in calibration)
    assert "prec_chol" not in RunFolder(a.path).read_tensors(RunFolder.DETECTOR)  # derived at load, stored once
    loaded = Pipeline.load(tmp_path / "a", device="cpu")
    torch.testing.assert_close(loaded.detector_.prec_chol_, fit(folders / "old").detector_.prec_chol_)


def test_writes_inside_a_model_and_into_another_model_are_refused(folders, tmp_path):
    model = tmp_path / "line"
    fit(folders / "old").save(model)
    with pytest.raises(RunFolderError, match="inside the model"):
        fit(folders / "old").save(model / "sub")
    with pytest.raises(RunFolderError, match="inside the model"):
        update_run(model, folders / "new", model / "v2")
    other = tmp_path / "other"
    fit(folders / "old", "patchcore").save(other)
    before = files_of(ModelFolder(other).version().path)
    with pytest.raises(RunFolderError, match="holds another model"):
        update_run(model, folders / "new", other)
    assert files_of(ModelFolder(other).version().path) == before


def test_a_version_whose_files_changed_is_refused(folders, tmp_path):
    model = tmp_path / "line"
    version = fit(folders / "old").save(model)
    detector = version / RunFolder.DETECTOR
    detector.chmod(0o644)
    data = bytearray(detector.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    detector.write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match="changed after the version was written"):
        Pipeline.load(model, device="cpu")


KILLED = """
import sys, time
from anomatune.folders import base, kinds
from anomatune.pipeline.update import update_run
from anomatune.folders.kinds import ModelFolder

step, model, new = sys.argv[1], sys.argv[2], sys.argv[3]
def hang(*args, **kwargs):
    print("hanging", flush=True)
    time.sleep(60)
if step == "update":
    kinds.ModelFolder._seal = staticmethod(hang)  # the version is staged, not yet renamed in
    update_run(model, new)
elif step == "promote":
    real = base.atomic_write
    def write(path, writer):
        real(path.with_name(path.name + ".partial"), writer)  # the new alias is written aside, never renamed in
        hang()
    base.atomic_write = write
    ModelFolder(model).promote("v1")
else:
    kinds.shutil.rmtree = hang  # the version is renamed away, not yet deleted
    ModelFolder(model).remove(keep=1)
"""


@pytest.mark.parametrize("step", ["update", "promote", "prune"])
def test_a_kill_at_any_step_leaves_the_versions_whole(folders, tmp_path, step):
    model = tmp_path / "line"
    fit(folders / "old").save(model)
    if step != "update":
        update_run(model, folders / "new")
    before = {v: files_of(ModelFolder(model).version(v).path) for v in ModelFolder(model).versions()}
    served = ModelFolder(model).served_name()
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED))
    process = subprocess.Popen(
        [sys.executable, str(script), step, str(model), str(folders / "new")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "hanging"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(0.1)
    after = ModelFolder(model)
    kept = [v for v in before if v in after.versions()]
    assert kept == (list(before) if step != "prune" else ["v2"]) and all(
        files_of(after.version(v).path) == before[v] for v in kept
    )
    assert after.served_name() == served and Pipeline.load(model, device="cpu").version_ == served
    fit(folders / "old").save(model)  # the next write clears what the killed command left
    assert not [p.name for p in (model / "versions").iterdir() if p.name.startswith(".")]
