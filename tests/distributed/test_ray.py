"""predict --engine ray on a local Ray cluster started by the test (2 CPUs): same results as the local engine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra anomatune[ray] (make test installs it)")
pq = pytest.importorskip("pyarrow.parquet")

from anomatune.distributed.batch import BatchScorer, predict_on_ray, scored_dataset  # noqa: E402
from anomatune.distributed.settings import EngineSettings  # noqa: E402
from anomatune.inference.predict import predict  # noqa: E402

from ..apps.test_cli import cli  # noqa: E402
from ..conftest import served  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def inputs(brick, tmp_path) -> list[Path]:
    """The brick test split, a truncated PNG and one image twice."""
    test = sorted((brick / "brick" / "test").rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(test[0].read_bytes()[:60])
    return [*test, broken, test[1]]


def read_results(folder: Path) -> list[dict]:
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    return sorted(rows, key=lambda r: r["index"])


def test_ray_predict_equals_the_local_engine(local_ray, fast_run, inputs, tmp_path):
    local = predict(fast_run, inputs, tmp_path / "local", device="cpu", batch_size=4)
    tally = predict_on_ray(
        fast_run, inputs, tmp_path / "ray", engine=EngineSettings(engine="ray", workers=2), device="cpu", batch_size=4
    )
    rows = read_results(tmp_path / "ray")
    assert [r["index"] for r in rows] == list(range(len(inputs)))
    assert [r["path"] for r in rows] == [str(p) for p in inputs]
    assert (tally.scored, tally.failed) == (len(inputs) - 1, 1)
    for mine, theirs in zip(rows, local):
        assert mine["decision"] == theirs.decision and mine["model"] == theirs.model and mine["model"].startswith("run@")
        if theirs.error:
            assert mine["score"] is None and "broken.png" in mine["error"]
        else:
            assert mine["score"] == pytest.approx(theirs.score, rel=1e-5, abs=1e-5) and mine["error"] is None
            assert (tmp_path / "ray" / mine["overlay"]).is_file() and (tmp_path / "ray" / mine["mask"]).is_file()
            assert mine["overlay"] == theirs.overlay
    assert tally.defective == sum(r.decision == "defective" for r in local)


def kill_once(marker: Path) -> type:
    """A scorer whose worker process dies on its first batch (once per ``marker``): Ray must restart it and retry the batch.

    Made in a function so that Ray ships the class by value, marker and all."""

    class KillOnce(BatchScorer):
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return KillOnce


def test_a_killed_actor_is_retried_and_every_input_appears_once(local_ray, fast_run, inputs, tmp_path):
    marker = tmp_path / "killed"
    dataset = scored_dataset(fast_run, inputs * 3, threshold=1.0, workers=2, device="cpu", batch_size=2, scorer=kill_once(marker))
    rows = dataset.take_all()
    assert marker.exists(), "no actor was killed: the test did not test anything"
    assert sorted(r["index"] for r in rows) == list(range(3 * len(inputs)))


def test_cli_predict_on_ray_and_ray_stays_unimported_without_it(local_ray, fast_run, inputs, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,line\n" + "".join(f"{p},7\n" for p in inputs))
    code, out, err = cli(
        "predict",
        fast_run,
        manifest,
        "--out",
        tmp_path / "p",
        "--engine",
        "ray",
        "--workers",
        "1",
        "--no-images",
        "--device",
        "cpu",
    )
    assert code == 1, err  # the broken file
    assert f"{len(inputs) - 1} images scored" in out and "1 failed" in out
    assert not (tmp_path / "p" / "overlays").exists()
    script = (
        "import sys; from anomatune.apps.cli import main; sys.argv = ['anomatune', 'predict', *sys.argv[1:]]\n"
        "try: main()\nexcept SystemExit: pass\nassert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(fast_run), str(inputs[0]), "--out", str(tmp_path / "q"), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "q" / "results.csv").is_file()


def test_fit_every_category_on_ray_equals_the_local_engine(local_ray, two_categories, tmp_path):
    from ..apps.test_cli import FAST_OPTIONS
    from ..apps.test_jobs import read_summary

    common = [
        "fit",
        "--data",
        two_categories,
        "--category",
        "all",
        "--detector",
        "padim",
        *FAST_OPTIONS,
        "--evaluate",
        "--no-figures",
    ]
    assert cli(*common, "--out", tmp_path / "local")[0] == 1
    code, stdout, err = cli(*common, "--out", tmp_path / "ray", "--engine", "ray", "--workers", "2")
    assert code == 1 and "2 of 3 categories done; failed: broken" in stdout, err
    local, remote = read_summary(tmp_path / "local"), read_summary(tmp_path / "ray")
    assert list(remote) == list(local)
    for category in ("brick", "widget", "mean"):
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            assert float(remote[category][metric]) == pytest.approx(float(local[category][metric]), abs=1e-4)
    assert remote["broken"]["error"] == local["broken"]["error"]
    assert (served(tmp_path / "ray" / "widget") / "config.yaml").is_file()
