"""A real server (uvicorn in a thread, on a free port) over the fast run, and a client."""

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (anomatune[serve]) is not installed; make test installs it")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` once started."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(runs, **settings):
    from anomatune.serve.app import create_app
    from anomatune.serve.models import ServedModel
    from anomatune.serve.settings import ServeSettings
    from anomatune.store import StoreSettings

    runtime = settings.pop("runtime", "torch")
    store = StoreSettings(**{key: settings.pop(key) for key in ("store", "station") if key in settings})
    models = [ServedModel.load(run, runtime, device="cpu") for run in runs]
    return Server(create_app(models, ServeSettings(runtime=runtime, **settings), store))


@pytest.fixture(scope="module")
def server(fast_run):
    with serve([fast_run], max_batch=8, max_wait_ms=20) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def images(brick):
    test = brick / "brick" / "test"
    return {
        "good": sorted((test / "good").glob("*.png"))[0],
        "defective": sorted(p for p in test.rglob("*.png") if p.parent.name != "good")[0],
    }
