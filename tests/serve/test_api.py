"""The HTTP API as a client uses it: answers equal the pipeline's, bad input is a one-line 4xx, batching, keys, engines."""

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomatune import Pipeline

from ..apps.test_cli import cli
from .conftest import free_port, httpx, serve


def upload(path, name=None):
    return ("file", (name or path.name, path.read_bytes(), "image/png"))


def png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def one_line_error(answer, status, text):
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and text in body["error"], body


def test_health_models_docs_and_page(client, fast_run):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models"] == 1
    (model,) = client.get("/models").json()
    assert model["name"] == "run" and model["detector"] == "padim" and model["id"].startswith("run@") and model["threshold"] > 0
    assert client.get("/docs").status_code == 200 and "/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "https://" not in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_equals_the_pipeline(client, fast_run, images):
    answer = client.post("/predict", files=[upload(images["good"]), upload(images["defective"])])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    pipeline = Pipeline.load(fast_run, device="cpu")
    expected = pipeline.predict([images["good"], images["defective"]])
    assert body["model"] == pipeline.model_id_ and body["threshold"] == pytest.approx(pipeline.threshold)
    for result, score, label, path in zip(body["results"], expected.scores, expected.labels, images.values()):
        assert result["file"] == path.name and result["score"] == pytest.approx(float(score), rel=1e-5)
        assert result["decision"] == ("defective" if label else "good")
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay"])))
        mask = Image.open(io.BytesIO(base64.b64decode(result["mask"])))
        assert overlay.size == mask.size == Image.open(path).size and mask.mode == "L"
    by_url = client.post("/predict?images=url", files=[upload(images["defective"])]).json()["results"][0]
    assert client.get(by_url["overlay"]).headers["content-type"] == "image/png"
    assert "overlay" not in client.post("/predict?images=none", files=[upload(images["good"])]).json()["results"][0]


def test_bad_input_is_a_one_line_4xx_and_the_server_goes_on(client, images):
    truncated = images["good"].read_bytes()[:100]
    cases = [
        ([("file", ("notes.txt", b"not an image at all", "text/plain"))], 415, "notes.txt: not an image"),
        ([("file", ("cut.png", truncated, "image/png"))], 400, "cut.png: cannot read image"),
        ([("file", ("dot.png", png(1, 1), "image/png"))], 400, "too small to inspect"),
        ([("file", ("wide.png", png(20000, 8), "image/png"))], 413, "20000x8 px; the largest side accepted is 10000"),
        ([("file", ("empty.png", b"", "image/png"))], 400, "empty.png: the file is empty"),
    ]
    for files, status, text in cases:
        one_line_error(client.post("/predict", files=files), status, text)
        assert client.post("/predict", files=[upload(images["good"])]).status_code == 200  # still answering
    one_line_error(client.post("/predict"), 400, "send it as the multipart form field 'file'")
    one_line_error(
        client.post("/predict", content=b"raw bytes", headers={"content-type": "application/octet-stream"}), 400, "'file'"
    )
    one_line_error(client.post("/predict", files=[upload(images["good"])], data={"model": "nope"}), 404, "no model 'nope'")
    one_line_error(client.post("/predict?images=gif", files=[upload(images["good"])]), 422, "images:")
    one_line_error(client.get("/images/gone.png"), 404, "not (or no longer) kept")
    assert client.get("/health").json()["status"] == "ok"


def test_concurrent_requests_share_forward_passes(server, images):
    before = httpx.get(f"{server.url}/health").json()

    def one(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post("/predict?images=none", files=[upload(images["defective"])]).json()["results"][0]["score"]

    with ThreadPoolExecutor(8) as pool:
        scores = list(pool.map(one, range(16)))
    after = httpx.get(f"{server.url}/health").json()
    assert np.allclose(scores, scores[0], rtol=1e-5)  # batched or not, the same image scores the same
    assert after["images"] - before["images"] == 16
    assert after["forward_passes"] - before["forward_passes"] < 16  # some requests shared a pass


def test_an_api_key_guards_every_route_but_the_page_and_health(fast_run, images):
    with serve([fast_run], api_key="s3cret") as running, httpx.Client(base_url=running.url, timeout=60) as c:
        one_line_error(c.post("/predict", files=[upload(images["good"])]), 401, "X-API-Key")
        one_line_error(c.post("/predict", files=[upload(images["good"])], headers={"X-API-Key": "wrong"}), 401, "wrong API key")
        assert c.post("/predict", files=[upload(images["good"])], headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/models").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_engines_answer_like_torch(fast_run, images, runtime):
    pytest.importorskip("onnxruntime" if runtime == "onnx" else "openvino")
    from anomatune.serve.models import ServedModel

    eager, exported = ServedModel.load(fast_run, "torch", "cpu"), ServedModel.load(fast_run, runtime, "cpu")
    pictures = [Image.open(p).convert("RGB") for p in images.values()]
    for a, b in zip(eager.score(pictures), exported.score(pictures)):
        assert b["score"] == pytest.approx(a["score"], rel=1e-4) and b["decision"] == a["decision"]


def test_two_models_need_a_model_field(fast_run, tmp_path, images):
    import shutil

    other = shutil.copytree(fast_run, tmp_path / "other")  # another name: another model id
    with serve([fast_run, other]) as running, httpx.Client(base_url=running.url, timeout=60) as c:
        one_line_error(c.post("/predict", files=[upload(images["good"])]), 400, "several models are served: pass model")
        answer = c.post("/predict", files=[upload(images["good"])], data={"model": "other"})
        assert answer.status_code == 200 and answer.json()["model"].startswith("other@")
        assert json.loads(c.get("/models").text)[1]["name"] == "other"


def test_the_serve_command_reads_the_key_from_the_environment(fast_run, images, tmp_path):
    code, _, err = cli("serve", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    port = free_port()
    command = [str(Path(sys.executable).parent / "anomatune"), "serve", str(fast_run), "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(
        command, env=os.environ | {"ANOMATUNE_API_KEY": "from-env"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, (
                    server.stderr.read() if server.poll() is not None else ""
                )
                time.sleep(0.2)
        assert httpx.post(url + "/predict", files=[upload(images["good"])]).status_code == 401
        assert httpx.post(url + "/predict", files=[upload(images["good"])], headers={"X-API-Key": "from-env"}).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
