"""The hot folder on a line: throughput and latency from a file written to its verdict received over MQTT.

A camera is played by a writer that puts transistor test images into a folder at 1, 10 and 50 images per second
(each written under a temporary name, then renamed, as cameras and FTP servers do); ``anomatune watch`` scores them
with PaDiM on EfficientNet-Lite0 (256 px, fitted on transistor's good images) and publishes each verdict to a local
Mosquitto; a subscriber notes when each arrives. Latency: rename → message received (p50, p95, max); throughput:
images per second from the first file to the last message. Run it on an idle machine.

    python benchmarks/watch_latency.py                       # 1, 10, 50 images/s, 20 s each, settle 0.2 s and 1 s
    python benchmarks/watch_latency.py --rates 10 --seconds 10

Writes ``results/watch_latency.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import ANOMATUNE, dataset, free_port, markdown_page, run_record, write_results


def start_broker(folder: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    return broker, port


def measure(model: Path, images: list[Path], rate: float, seconds: float, settle: float, port: int, work: Path) -> dict:
    import paho.mqtt.client as mqtt

    camera = work / f"camera-{rate}-{settle}"
    camera.mkdir()
    received: dict[str, float] = {}
    ready = threading.Event()  # the watcher's model is loaded: its retained status arrived

    def on_message(_client, _userdata, message) -> None:
        if message.topic.endswith("/inspection"):
            received.setdefault(json.loads(message.payload)["file_name"], time.perf_counter())
        elif json.loads(message.payload).get("online"):
            ready.set()

    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe(f"bench/{camera.name}/+/+", qos=1)
    subscriber.loop_start()
    command = [str(ANOMATUNE), "watch", str(model), "--in", str(camera), "--settle", str(settle), "--device", "cpu",
               "--mqtt", f"mqtt://127.0.0.1:{port}", "--mqtt-topic", "bench", "--station", camera.name,
               "--store", str(work / f"{camera.name}.sqlite")]  # fmt: skip
    log = work / f"{camera.name}.log"
    watcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    if not ready.wait(120):
        raise RuntimeError(f"the watcher did not start: {log.read_text()[-2000:]}")
    n = max(10, int(rate * seconds))
    written: dict[str, float] = {}
    start = time.perf_counter()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        name = f"part_{i:05d}.png"
        temporary = camera / f"{name}.tmp"
        shutil.copyfile(images[i % len(images)], temporary)
        temporary.rename(camera / name)
        written[name] = time.perf_counter()
    deadline = time.perf_counter() + 120 + n / 5
    while len(received) < n and time.perf_counter() < deadline and watcher.poll() is None:
        time.sleep(0.05)
    watcher.terminate()
    watcher.wait(30)
    subscriber.loop_stop()
    latencies = np.array([received[k] - written[k] for k in written if k in received])
    last = max(received.values()) if received else float("nan")
    return {
        "rate": rate,
        "settle": settle,
        "images": n,
        "received": len(received),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "latency_max_s": round(float(latencies.max()), 3),
        "throughput_per_s": round(len(received) / (last - start), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", nargs="+", type=float, default=[1, 10, 50])
    parser.add_argument("--settles", nargs="+", type=float, default=[0.2, 1.0])
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    root, category = dataset("transistor")
    images = sorted((root / category / "test").rglob("*.png"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "model"
        subprocess.run([str(ANOMATUNE), "fit", "--data", str(root), "--category", category, "--detector", "padim",
                        "--image-size", "256x256", "--out", str(model)], check=True, capture_output=True)  # fmt: skip
        broker, port = start_broker(work)
        try:
            for settle in args.settles:
                for rate in args.rates:
                    row = measure(model, images, rate, args.seconds, settle, port, work)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            broker.terminate()
    data = run_record(rows)
    cells = [(r["rate"], r["settle"], r["images"], r["received"], r["latency_p50_s"], r["latency_p95_s"], r["latency_max_s"],
              r["throughput_per_s"]) for r in rows]  # fmt: skip
    write_results("watch_latency", data, markdown_page(
        "Hot folder: latency from file to MQTT message, and throughput",
        data,
        "transistor test images (1024x1024 PNG), PaDiM on Lite0 at 256x256, local Mosquitto, QoS 1, SQLite store",
        ("images/s written", "settle s", "images", "messages", "latency p50 s", "p95 s", "max s", "throughput images/s"),
        cells,
    ))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
