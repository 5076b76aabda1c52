"""anomatune watch: complete images only, each scored exactly once across kill -9, verdicts over MQTT."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anomatune import Pipeline
from anomatune.line.hotfolder import CLAIMED, DONE, FAILED, OVERLAYS, HotFolder, Watcher
from anomatune.line.settings import MqttSettings, WatchSettings
from anomatune.store import InspectionStore, StoreSettings
from anomatune.store.inspections import DATABASE


@pytest.fixture
def model(fast_run, tmp_path):
    """A copy of the fast model: its inspections database is this test's alone."""
    shutil.copytree(fast_run, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def parts(brick):
    return sorted((brick / "brick" / "test").rglob("*.png"))


def test_once_scores_each_complete_image_moves_it_and_records_it(model, parts, tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    for part in parts[:3]:
        shutil.copy(part, camera / part.name.replace(".png", f"_{part.parent.name}.png"))
    (camera / "cut.png").write_bytes(parts[0].read_bytes()[:200])  # truncated: failed, not lost
    (camera / "writing.png.tmp").write_bytes(b"...")  # a writer's temporary name: never read
    watcher = Watcher(model, WatchSettings(folder=str(camera), settle=0, poll=True, once=True), device="cpu")
    assert watcher.run() == 3
    store = InspectionStore(model / DATABASE)
    rows = {r["file_name"]: r for r in store.inspections()}
    assert sorted(rows) == sorted(p.name for p in camera.joinpath(DONE).iterdir()) + ["cut.png"]
    assert rows["cut.png"]["verdict"] == "failed" and "cut.png" in rows["cut.png"]["error"]
    assert [p.name for p in camera.joinpath(FAILED).iterdir()] == ["cut.png"]
    assert sorted(p.name for p in camera.iterdir() if p.is_file()) == ["writing.png.tmp"]
    expected = Pipeline.load(model).predict(sorted(camera.joinpath(DONE).iterdir()))
    done = sorted(camera.joinpath(DONE).iterdir())
    np.testing.assert_allclose([rows[p.name]["score"] for p in done], expected.scores, rtol=1e-5)
    assert [rows[p.name]["verdict"] for p in done] == ["defect" if x else "good" for x in expected.labels]
    assert all(Path(rows[p.name]["overlay_path"]).parent == camera / OVERLAYS for p in done)
    assert all(Path(rows[p.name]["image_path"]) == p.resolve() for p in done)
    assert {r["version"] for r in rows.values()} == {"v1"}


def test_a_file_still_being_written_is_waited_for(tmp_path):
    folder = HotFolder(tmp_path, settle=0.3)
    part = tmp_path / "a.png"
    part.write_bytes(b"x" * 10)
    assert folder.ready(8) == []  # first sight
    time.sleep(0.2)
    with part.open("ab") as f:
        f.write(b"y" * 10)  # still growing
    assert folder.ready(8) == [] and folder.waiting()
    time.sleep(0.35)
    assert folder.ready(8) == [part]
    claimed = folder.claim(part)
    assert claimed == tmp_path / CLAIMED / "a.png" and not part.exists() and not folder.waiting()


def test_a_missing_folder_is_one_line(model, tmp_path):
    from anomatune.errors import AnomatuneError

    with pytest.raises(AnomatuneError, match="no such folder to watch"):
        Watcher(model, WatchSettings(folder=str(tmp_path / "nope")))


def _rows(database: Path) -> list[dict]:
    return InspectionStore(database).inspections(limit=10_000) if database.exists() else []


def test_kill_9_while_a_camera_writes_ends_with_each_image_scored_exactly_once(model, parts, tmp_path):
    camera, database = tmp_path / "camera", tmp_path / "line.sqlite"
    camera.mkdir()
    n = 24
    command = [str(Path(sys.executable).with_name("anomatune")), "watch", str(model), "--in", str(camera), "--settle", "0.4",
               "--poll", "--interval", "0.05", "--batch", "4", "--store", str(database), "--device", "cpu"]  # fmt: skip

    def write_slowly():
        """Half the files written in pieces in place (the settling must wait), half under a temporary name then renamed."""
        for i in range(n):
            data = parts[i % len(parts)].read_bytes() + i.to_bytes(4, "big")  # a distinct part each time
            target = camera / f"part_{i:03d}.png"
            if i % 2:
                with open(target, "wb") as f:
                    for start in range(0, len(data), len(data) // 3 + 1):
                        f.write(data[start : start + len(data) // 3 + 1])
                        f.flush()
                        time.sleep(0.05)
            else:
                temporary = camera / f"part_{i:03d}.png.tmp"
                temporary.write_bytes(data)
                os.rename(temporary, target)
            time.sleep(0.1)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    try:
        for kill_after in (3, 10):  # kill -9 twice, in the middle of the stream
            watcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + 180
            while len(_rows(database)) < kill_after:
                assert watcher.poll() is None, watcher.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.killpg(watcher.pid, signal.SIGKILL)
            watcher.wait()
    finally:
        writer.join()
    finished = subprocess.run([*command, "--once"], capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    rows = _rows(database)
    assert sorted(r["file_name"] for r in rows) == [f"part_{i:03d}.png" for i in range(n)]  # each once
    assert all(r["verdict"] in ("good", "defect") for r in rows)  # none read half-written
    assert sorted(p.name for p in (camera / DONE).iterdir()) == [f"part_{i:03d}.png" for i in range(n)]
    assert not [p for p in camera.iterdir() if p.is_file()] and not list((camera / CLAIMED).iterdir())


def test_verdicts_reach_a_subscriber_through_a_broker_restart(model, parts, tmp_path, mosquitto):
    import paho.mqtt.client as mqtt

    received, statuses = {}, {}

    def on_message(_client, _userdata, message):
        if message.topic.endswith("/inspection"):
            payload = json.loads(message.payload)
            received[payload["id"]] = payload
        elif message.topic.endswith("/status"):
            statuses[message.topic] = json.loads(message.payload)

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dashboard", clean_session=False)
    subscriber.on_connect = lambda client, *_: client.subscribe("line/#", qos=1)
    subscriber.on_message = on_message
    subscriber.reconnect_delay_set(0.2, 1)
    subscriber.connect("127.0.0.1", mosquitto.port)
    subscriber.loop_start()
    camera = tmp_path / "camera"
    camera.mkdir()
    settings = WatchSettings(folder=str(camera), settle=0.1, poll=True, interval=0.05)
    watcher = Watcher(
        model, settings, MqttSettings(url=mosquitto.url, topic="line"), StoreSettings(station="cell-1"), device="cpu"
    )
    running = threading.Thread(target=watcher.run)
    running.start()

    def wait_for(condition, seconds=60):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline and running.is_alive()
            time.sleep(0.05)

    def drop(first, count):
        for i in range(first, first + count):
            (camera / f"p{i}.png").write_bytes(parts[i % len(parts)].read_bytes() + bytes([i]))

    try:
        drop(0, 3)
        wait_for(lambda: len(received) == 3)
        mosquitto.stop()
        drop(3, 3)  # scored while the broker is away: kept in the outbox
        store = InspectionStore(model / DATABASE)
        wait_for(lambda: store.tally()["inspected"] == 6)
        mosquitto.start()
        wait_for(lambda: len(received) == 6)
    finally:
        watcher.stop()
        running.join(30)
        subscriber.loop_stop()
    assert {m["file_name"] for m in received.values()} == {f"p{i}.png" for i in range(6)}
    assert {m["station"] for m in received.values()} == {"cell-1"} and all(m["version"] == "v1" for m in received.values())
    assert store.unpublished() == []
    assert statuses["line/cell-1/model/status"] | {"online": None} == {
        "version": "v1",
        "model_id": Pipeline.load(model).model_id_,
        "threshold": Pipeline.load(model).threshold,
        "online": None,
    }  # retained; offline once the watcher stopped


def test_a_server_with_a_hot_folder_lists_the_folders_inspections(model, parts, tmp_path):
    httpx = pytest.importorskip("httpx")
    from .conftest import free_port

    camera, port = tmp_path / "camera", free_port()
    camera.mkdir()
    command = [str(Path(sys.executable).with_name("anomatune")), "serve", str(model), "--port", str(port), "--device", "cpu",
               "--in", str(camera), "--settle", "0", "--poll", "--interval", "0.05"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        shutil.copy(parts[0], camera / "from_the_camera.png")
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
            try:
                rows = httpx.get(f"http://127.0.0.1:{port}/inspections", timeout=2).json()
            except httpx.HTTPError:
                rows = []
            if rows:
                break
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert [(r["file_name"], r["source"]) for r in rows] == [("from_the_camera.png", "watch")]
    assert (camera / DONE / "from_the_camera.png").is_file()


def test_retention_deletes_the_oldest_files_by_age_then_size(tmp_path):
    from anomatune.line.hotfolder import prune

    done, overlays = tmp_path / "done", tmp_path / "overlays"
    done.mkdir(), overlays.mkdir()
    now = time.time()
    for i, (folder, days_old) in enumerate([(done, 10), (overlays, 5), (done, 2), (overlays, 1), (done, 0)]):
        path = folder / f"f{i}"
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - days_old * 86400, now - days_old * 86400))
    assert prune([done, overlays], keep_days=7, keep_bytes=None, now=now) == 1  # f0, ten days old
    assert prune([done, overlays], keep_days=None, keep_bytes=250, now=now) == 2  # then the oldest: f1, f2
    assert sorted(p.name for p in [*done.iterdir(), *overlays.iterdir()]) == ["f3", "f4"]
