"""New versions swapped in under load, and the drift of recent scores (/models, /metrics)."""

import logging
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from anomatune.pipeline.update import update_run
from anomatune.serve.drift import DriftMonitor, ks_statistic

from .conftest import serve


@pytest.fixture
def own_run(fast_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fast_run, run)
    return run


@pytest.fixture
def new_good(brick, tmp_path):
    folder = tmp_path / "new_good"
    folder.mkdir()
    for path in sorted((brick / "brick" / "train" / "good").glob("*.png"))[:4]:  # mirrored: images not learnt yet
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"new_{path.name}")
    return folder


class Load:
    """Clients posting /predict without a pause until stopped; every answer's status and model id."""

    def __init__(self, url: str, image: bytes, clients: int = 4):
        self.url, self.image, self.stop = url, image, threading.Event()
        self.answers: list[tuple[int, str | None]] = []
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def run(self):
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                answer = c.post("/predict?images=none", files={"file": ("p.png", self.image)})
                self.answers.append((answer.status_code, answer.json().get("model")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        while len(self.answers) < 8:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_a_reload_under_load_swaps_the_version_without_a_failed_request(own_run, new_good, images):
    with serve([own_run], max_batch=4, max_wait_ms=5) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        (before,) = c.get("/models").json()
        assert before["parent"] is None and before["version"] == "v1" and before["id"].startswith("run@")
        with Load(server.url, images["good"].read_bytes()) as load:
            update_run(own_run, new_good)  # a new version beside the first, served
            (stale,) = c.get("/models").json()
            answer = c.post("/models/run/reload")
            assert answer.status_code == 200, answer.text
            served = len(load.answers)
            while len(load.answers) < served + 8:
                time.sleep(0.01)
        (after,) = c.get("/models").json()
    assert stale["stale"] is True and stale["id"] == before["id"]
    assert after["parent"] == before["id"] and after["id"] != before["id"] and after["stale"] is False
    statuses = [status for status, _ in load.answers]
    assert statuses.count(200) == len(statuses)  # not one request failed
    models = {model for _, model in load.answers}
    assert models == {before["id"], after["id"]}  # both versions answered, each whole


def test_watch_picks_up_a_new_version_and_never_a_half_written_one(own_run, new_good, images, caplog):
    with serve([own_run], watch=0.1) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        (before,) = c.get("/models").json()
        with Load(server.url, images["good"].read_bytes(), clients=2) as load:
            update_run(own_run, new_good)
            deadline = time.monotonic() + 30
            while c.get("/models").json()[0]["id"] == before["id"]:
                assert time.monotonic() < deadline, "the new version was not picked up"
                time.sleep(0.05)
        (after,) = c.get("/models").json()
        assert after["parent"] == before["id"]
        # an alias on a version that is not there is not followed: the served version stays
        (own_run / "aliases.json").write_text('{"served": "v9"}')
        with caplog.at_level(logging.WARNING, logger="anomatune.serve.app"):
            answer = c.post("/models/run/reload")
            time.sleep(0.5)
        assert answer.status_code == 409 and f"still serving {after['id']}" in answer.json()["error"]
        assert c.post("/predict?images=none", files={"file": ("p.png", images["good"].read_bytes())}).status_code == 200
        assert c.get("/models").json()[0]["id"] == after["id"]
        assert "could not be loaded" in caplog.text
    assert {status for status, _ in load.answers} == {200}


def test_ks_statistic_against_hand_computed_cases():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2], [3, 4]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)  # F = 1/2 vs 0 at 2
    assert np.isnan(ks_statistic([], [1.0]))


def test_the_drift_monitor_warns_once_when_the_scores_move(caplog):
    rng = np.random.default_rng(0)
    monitor = DriftMonitor("m@1", rng.normal(0, 1, 50), threshold=2.0, window=40, bound=0.5)
    monitor.add(rng.normal(0, 1, 29))
    assert monitor.stats()["drift"] is None and monitor.stats()["window"] == 29  # too few scores to say
    with caplog.at_level(logging.WARNING, logger="anomatune.serve.drift"):
        monitor.add(rng.normal(0, 1, 11))
        assert monitor.stats()["drift"] < 0.5 and not caplog.records
        for _ in range(5):
            monitor.add(rng.normal(3, 1, 10))  # the line changed: the window fills with high scores
    stats = monitor.stats()
    assert stats["drift"] > 0.5 and stats["window"] == 40 and stats["scored"] == 90
    assert stats["alarm_share"] > 0.5 and stats["quantiles"]["0.5"] > 2.0
    assert len([r for r in caplog.records if "drift" in r.getMessage()]) == 1  # once, not at every request


def test_metrics_are_served_in_the_prometheus_format(own_run, images):
    from prometheus_client.parser import text_string_to_metric_families

    with serve([own_run], drift_window=50) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        for _ in range(3):
            c.post("/predict?images=none", files=[("file", ("a.png", images["good"].read_bytes()))] * 12)
        text = c.get("/metrics")
        (model,) = c.get("/models").json()
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    samples = {(s.name, s.labels.get("quantile")): s for f in text_string_to_metric_families(text.text) for s in f.samples}
    assert samples[("anomatune_requests_total", None)].value == 3
    assert samples[("anomatune_model_images_total", None)].value == 36
    assert samples[("anomatune_window_images", None)].value == 36
    assert samples[("anomatune_drift_ks", None)].value == pytest.approx(model["drift"]["drift"])
    assert samples[("anomatune_score_quantile", "0.5")].labels["model"] == model["name"]  # stable across versions
    assert model["drift"]["calibration_images"] >= 1
