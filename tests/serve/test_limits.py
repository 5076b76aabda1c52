"""The server under hostile input: byte and pixel budgets, large requests split, a cache bounded in bytes, the truth
about what it serves."""

import shutil
import time

import pytest

from anomatune.errors import AnomatuneError
from anomatune.pipeline.update import threshold_version

from ..conftest import png_header
from .conftest import httpx, serve
from .test_api import one_line_error, upload


def test_a_decompression_bomb_is_413_with_its_size(client, images):
    bomb = [("file", ("bomb.png", png_header(20000, 20000), "image/png"))]
    one_line_error(client.post("/predict", files=bomb), 413, "bomb.png: 400.0 megapixels is more than")
    assert client.post("/predict", files=[upload(images["good"])]).status_code == 200


def test_a_request_over_the_byte_budget_is_refused_without_being_read(fast_run, images):
    with serve([fast_run], max_request_mb=0.01) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        big = [("file", ("big.png", b"\0" * 50_000, "image/png"))]
        one_line_error(c.post("/predict", files=big), 413, "larger than the 0.01 MB accepted (--max-request-mb)")

        def streamed():  # no Content-Length: counted as it arrives
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\nContent-Type: image/png\r\n\r\n'
            for _ in range(100):
                yield b"\0" * 4096

        headers = {"content-type": "multipart/form-data; boundary=x"}
        one_line_error(c.post("/predict", content=streamed(), headers=headers), 413, "--max-request-mb")
        assert c.get("/health").json()["status"] == "ok"


def test_pixels_over_the_budget_are_413_before_decoding(fast_run, images):
    from anomatune.serve.app import create_app
    from anomatune.serve.models import ServedModel
    from anomatune.serve.settings import ServeSettings

    from .conftest import Server

    model = ServedModel.load(fast_run, "torch", "cpu", max_pixels=1000)
    with Server(create_app([model], ServeSettings())) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        one_line_error(c.post("/predict", files=[upload(images["good"])]), 413, "is more than the 0.001 megapixels accepted")


def test_a_request_is_bounded_in_pixels_all_its_images_together(fast_run, images):
    with serve([fast_run], max_request_pixels=2000) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        many = [upload(images["good"], f"{i}.png") for i in range(4)]
        one_line_error(c.post("/predict", files=many), 413, "at most 0.002 are accepted per request (--max-request-pixels)")


def test_a_served_version_never_reads_its_files_again(fast_run, tmp_path, images):
    from ..conftest import served

    run = shutil.copytree(fast_run, tmp_path / "run")
    with serve([run]) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        before = c.post("/predict?images=none", files=[upload(images["good"])]).json()["results"][0]["score"]
        detector = served(run) / "detector.safetensors"
        detector.chmod(0o644)
        detector.write_bytes(detector.read_bytes()[:100])  # cut under the server
        answer = c.post("/predict?images=none", files=[upload(images["good"])])
        assert answer.status_code == 200 and answer.json()["results"][0]["score"] == before
        refused = c.post("/models/run/reload")  # and the damaged version is not loaded
        assert refused.status_code == 409 and "changed after the version was written" in refused.json()["error"]


def test_a_reload_of_the_same_version_keeps_its_drift_window(fast_run, images):
    with serve([fast_run]) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        for _ in range(3):
            c.post("/predict?images=none", files=[upload(images["good"])])
        assert c.post("/models/run/reload").json()["drift"]["window"] == 3


def test_free_memory_goes_back_after_a_large_request(monkeypatch):
    import asyncio

    import anomatune.serve.app as app

    released = []
    monkeypatch.setattr(app, "release_memory", lambda: released.append(1))

    async def holds():
        budget = app.PixelBudget(100_000_000)
        async with budget.hold(1_000_000):  # small: not worth a release
            pass
        async with budget.hold(20_000_000), budget.hold(10_000_000):  # released once, when the last one ends
            assert released == []
        return budget

    asyncio.run(holds())
    assert released == [1]


def test_max_batch_splits_one_large_request(fast_run, images):
    with serve([fast_run], max_batch=4, max_wait_ms=0) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        answer = c.post("/predict?images=none", files=[upload(images["good"], f"{i}.png") for i in range(10)])
        assert answer.status_code == 200 and [r["file"] for r in answer.json()["results"]] == [f"{i}.png" for i in range(10)]
        health = c.get("/health").json()
        assert health["images"] == 10 and health["forward_passes"] >= 3 and health["requests"] == 1


def test_models_describe_what_is_loaded_and_say_when_the_run_changed(fast_run, tmp_path, images):
    run = shutil.copytree(fast_run, tmp_path / "served")
    with serve([run]) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        (before,) = c.get("/models").json()
        assert before["stale"] is False
        time.sleep(0.01)
        threshold_version(run, false_alarm_rate=0.05)  # a new version served on disk
        (after,) = c.get("/models").json()
        assert after["stale"] is True and after["id"] == before["id"] and after["threshold"] == before["threshold"]


def test_the_image_cache_is_bounded_in_bytes():
    from anomatune.serve.app import ApiError, BoundedCache

    cache = BoundedCache(capacity=100)
    keys = [cache.put(b"x" * 40, 40) for _ in range(5)]
    assert cache.used <= 100 and len(cache.items) == 2
    assert cache.get(keys[-1], "gone") == b"x" * 40
    with pytest.raises(ApiError, match="gone"):
        cache.get(keys[0], "gone")


def test_two_runs_of_one_name_are_refused(fast_run, tmp_path):
    from anomatune.serve.app import create_app
    from anomatune.serve.models import ServedModel

    twin = shutil.copytree(fast_run, tmp_path / "twin" / fast_run.name)
    with pytest.raises(AnomatuneError, match=f"several runs are named {fast_run.name}"):
        create_app([ServedModel.load(fast_run, "torch", "cpu"), ServedModel.load(twin, "torch", "cpu")])


def test_images_none_draws_nothing(fast_run, images):
    from PIL import Image

    from anomatune.serve.models import ServedModel

    model = ServedModel.load(fast_run, "torch", "cpu")
    pictures = [Image.open(p).convert("RGB") for p in images.values()]
    plain, drawn = model.score(pictures, drawn=[False, True])
    assert set(plain) == {"score", "normalized_score", "false_alarm_rate", "decision"} and {"overlay", "mask"} <= set(drawn)
