"""POST /feedback: the operator's verdicts, stored append-only beside the run, never lost or corrupted."""

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from anomatune.folders.feedback import FeedbackStore

from ..conftest import served
from .conftest import free_port, serve


@pytest.fixture
def own_run(fast_run, tmp_path):
    """A copy of the fast run: its feedback is this test's alone."""
    run = tmp_path / "run"
    shutil.copytree(fast_run, run)
    return run


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_feedback_on_a_scored_image_is_stored_beside_the_run(own_run, images):
    with serve([own_run]) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        data = images["defective"].read_bytes()
        (result,) = c.post("/predict?images=none", files={"file": ("part.png", data)}).json()["results"]
        width, height = Image.open(images["defective"]).size
        drawn = np.zeros((height, width), np.uint8)
        drawn[2:6, 3:9] = 255
        answer = c.post(
            "/feedback",
            data={"id": result["id"], "verdict": "defect", "note": "scratch near the edge"},
            files={"mask": ("mask.png", png(drawn))},
        )
        assert answer.status_code == 200, answer.text
        (model,) = c.get("/models").json()
    store = FeedbackStore(own_run)
    assert store.path == own_run / "feedback" and FeedbackStore(served(own_run)).path == store.path  # the model's
    (record,) = store.records()
    assert record["id"] == answer.json()["id"] and record["verdict"] == "defect" and record["note"] == "scratch near the edge"
    assert record["model"] == model["id"] and record["score"] == pytest.approx(result["score"])
    assert record["result_id"] == result["id"] and record["file"] == "part.png" and record["version"] == "v1"
    assert record["threshold"] == model["threshold"] and record["decision"] == result["decision"]
    assert store.file(record["image"]).read_bytes() == data  # the upload itself, byte for byte
    assert (np.asarray(Image.open(store.file(record["mask"]))) == drawn).all()


def test_bad_feedback_is_a_one_line_4xx_and_nothing_is_stored(own_run, images):
    with serve([own_run]) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        data = images["good"].read_bytes()
        width, height = Image.open(images["good"]).size
        cases = [
            ({"verdict": "good"}, {}, 400, "send the 'id' of a result of /predict, or the image as 'file'"),
            ({"verdict": "good", "id": "0" * 32}, {}, 404, "send the image as 'file' instead"),
            ({"verdict": "maybe"}, {"file": ("a.png", data)}, 422, "verdict"),
            ({"verdict": "defect"}, {"file": ("a.png", data), "mask": ("m.png", png(np.zeros((3, 3), np.uint8)))}, 400, "3x3 px"),
            (
                {"verdict": "defect"},
                {"file": ("a.png", data), "mask": ("m.png", png(np.full((height, width), 128, np.uint8)))},
                400,
                "not binary",
            ),
            ({"verdict": "good"}, {"file": ("a.png", b"not an image")}, 415, "a.png"),
        ]
        for fields, files, status, message in cases:
            answer = c.post("/feedback", data=fields, files=files or None)
            assert answer.status_code == status, (fields, answer.text)
            assert message in answer.json()["error"] and "\n" not in answer.json()["error"]
        assert c.get("/health").status_code == 200
    assert FeedbackStore(own_run).records() == []
    assert width and height


def test_eight_clients_at_once_lose_nothing(own_run, images):
    data = images["good"].read_bytes()
    with serve([own_run]) as server:

        def client(k: int) -> list[str]:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                return [
                    c.post("/feedback", data={"verdict": "good", "note": f"{k}-{i}"}, files={"file": ("p.png", data)}).json()[
                        "id"
                    ]
                    for i in range(4)
                ]

        with ThreadPoolExecutor(8) as pool:
            ids = [i for batch in pool.map(client, range(8)) for i in batch]
    records = FeedbackStore(own_run).records()
    assert sorted(r["id"] for r in records) == sorted(ids) and len(set(ids)) == 32
    assert sorted(r["note"] for r in records) == sorted(f"{k}-{i}" for k in range(8) for i in range(4))
    assert all(FeedbackStore(own_run).file(r["image"]).read_bytes() == data for r in records)


def test_a_line_cut_by_a_crash_is_dropped_and_the_next_one_starts_clean(tmp_path):
    store = FeedbackStore(tmp_path / "run")
    first = store.add(b"image", ".png", {"verdict": "good"})
    with open(store.log_path, "ab") as log:
        log.write(b'{"id": "cut in the mid')  # what a kill -9 during a write can leave
    assert [r["id"] for r in store.records()] == [first["id"]]
    second = store.add(b"image", ".png", {"verdict": "defect"})
    assert [r["id"] for r in store.records()] == [first["id"], second["id"]]
    assert store.log_path.read_bytes().count(b"\n") == 2


def test_feedback_survives_kill_9(own_run, images):
    """A server killed mid-stream: what is stored is a prefix of what was sent, every line whole, every image there."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("anomatune")), "serve", str(own_run), "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    data = images["good"].read_bytes()
    acknowledged, stop = [], threading.Event()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(0.2)

        def send():
            with httpx.Client(base_url=url, timeout=10) as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    try:
                        answer = c.post("/feedback", data={"verdict": "good", "note": str(i)}, files={"file": ("p.png", data)})
                    except httpx.HTTPError:
                        return
                    if answer.status_code == 200:
                        acknowledged.append(i)

        sender = threading.Thread(target=send)
        sender.start()
        while len(acknowledged) < 5 and sender.is_alive():
            time.sleep(0.01)
        os.killpg(server.pid, signal.SIGKILL)
        stop.set()
        sender.join(timeout=30)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    store = FeedbackStore(own_run)
    notes = [int(r["note"]) for r in store.records()]
    assert notes == list(range(len(notes)))  # a prefix of what was sent, in order
    assert len(notes) >= len(acknowledged) >= 5  # nothing acknowledged was lost
    assert all(store.file(r["image"]).read_bytes() == data for r in store.records())


def test_the_store_lies_in_the_model_folder_even_when_named_by_a_dot(tmp_path, monkeypatch):
    run = tmp_path / "line_7"
    run.mkdir()
    monkeypatch.chdir(run)
    assert FeedbackStore(".").path == tmp_path.resolve() / "line_7" / "feedback"


def test_cross_origin_writes_are_refused_whatever_the_key(own_run, images):
    data = images["good"].read_bytes()
    with serve([own_run]) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        planted = c.post(
            "/feedback",
            data={"verdict": "good"},
            files={"file": ("p.png", data)},
            headers={"Origin": "http://evil.example"},
        )
        assert planted.status_code == 403 and "cross-origin" in planted.json()["error"]
        own = c.post("/feedback", data={"verdict": "good"}, files={"file": ("p.png", data)}, headers={"Origin": server.url})
        assert own.status_code == 200, own.text
    assert len(FeedbackStore(own_run).records()) == 1


def test_a_huge_mask_is_refused_from_its_header(own_run, images):
    from tests.conftest import png_header

    data = images["good"].read_bytes()
    with serve([own_run]) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        (result,) = c.post("/predict?images=none", files={"file": ("p.png", data)}).json()["results"]
        answer = c.post(
            "/feedback", data={"id": result["id"], "verdict": "defect"}, files={"mask": ("m.png", png_header(13000, 13000))}
        )
        assert answer.status_code in (400, 413) and "13000x13000" in answer.json()["error"]


def test_a_threshold_set_from_the_api_is_a_new_version(own_run, images):
    from anomatune.folders.kinds import ModelFolder

    with serve([own_run], api_key="k") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        (before,) = c.get("/models", headers={"X-API-Key": "k"}).json()
        refused = c.post("/models/run/threshold", data={"false_alarm_rate": "0.05"})
        assert refused.status_code == 401
        answer = c.post("/models/run/threshold", data={"false_alarm_rate": "0.05"}, headers={"X-API-Key": "k"})
        assert answer.status_code == 200, answer.text
        after = answer.json()
    assert after["version"] == "v2" and after["false_alarm_rate"]["target"] == 0.05 and after["threshold"] < before["threshold"]
    assert ModelFolder(own_run).versions() == ["v1", "v2"] and after["parent"] == before["id"]
    with serve([own_run]) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        closed = c.post("/models/run/threshold", data={"false_alarm_rate": "0.02"})
        assert closed.status_code == 403 and "--api-key" in closed.json()["error"]


def test_every_inspection_and_verdict_is_kept_and_listed_for_dashboards(own_run, images, tmp_path):
    from anomatune.store import InspectionStore

    database = tmp_path / "line.sqlite"
    with serve([own_run], store=str(database), station="cell-2") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        files = [("file", (p.name, p.read_bytes())) for p in (images["good"], images["defective"], images["good"])]
        results = c.post("/predict?images=none", files=files).json()["results"]
        c.post("/feedback", data={"id": results[1]["id"], "verdict": "good", "note": "dust"}).raise_for_status()
        listed = c.get("/inspections").json()
        tally = c.get("/tally").json()
        good_only = c.get("/inspections", params={"verdict": "good"}).json()
        later = c.get("/inspections", params={"since": "2999-01-01T00:00:00Z"}).json()
        bad = c.get("/inspections", params={"since": "yesterday"})
    assert sorted(r["id"] for r in listed) == sorted(r["id"] for r in results)
    assert {r["station"] for r in listed} == {"cell-2"} and {r["version"] for r in listed} == {"v1"}
    row = next(r for r in listed if r["id"] == results[1]["id"])
    assert row["operator_verdict"] == "good" and row["operator_note"] == "dust" and row["score"] == results[1]["score"]
    decisions = [r["decision"] for r in results]
    assert (
        tally["inspected"] == 3 and tally["good"] == decisions.count("good") and tally["defect"] == decisions.count("defective")
    )
    assert tally["confirmed"] + tally["overturned"] == 1
    assert all(r["verdict"] == "good" for r in good_only) and later == []
    assert bad.status_code == 422
    assert len(InspectionStore(database).inspections()) == 3  # in the database, after the server stopped
