"""A real MQTT broker (Debian's Mosquitto) and a real PostgreSQL server, started by the tests where installed."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

POSTGRES_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {process.stderr.read().decode()[-1000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


class Mosquitto:
    """A broker on a free port, with a persistence file: stopped and started again on the same port."""

    def __init__(self, folder: Path):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port, self.folder = free_port(), folder
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nautosave_interval 1\n"
        )
        self.process = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def mosquitto():
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("no MQTT broker: Debian's mosquitto is not installed (make test installs it where apt-get can)")
    pytest.importorskip("paho.mqtt", reason="paho-mqtt is not installed: pip install 'anomatune[line]'")
    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="anomatune-mosquitto-")))  # not under pytest's root-only folders
    if os.geteuid() == 0 and _user_exists("mosquitto"):  # the broker drops root for this user
        shutil.chown(broker.folder, "mosquitto")
    broker.start()
    yield broker
    broker.stop()
    shutil.rmtree(broker.folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary folder (as the postgres user when the tests run as root); its URL."""
    versions = sorted(POSTGRES_BIN.glob("*/bin/initdb"))
    if not versions:
        pytest.skip("no PostgreSQL server: Debian's postgresql is not installed (make test installs it where apt-get can)")
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'anomatune[line]'")
    bin_dir = versions[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="anomatune-postgres-"))  # not under pytest's root-only folders
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not _user_exists("postgres"):
            pytest.skip("PostgreSQL refuses to run as root and there is no postgres user")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder), "-h", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, server)
        time.sleep(0.5)  # accepting connections a moment after it listens
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
