"""What every benchmark shares: where ../shared/data is, its categories, where results go, scoring cached features."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# ../shared/data beside the checkout, or ANOMATUNE_DATA (e.g. a copy of part of it on a lent GPU machine)
SHARED = Path(os.environ.get("ANOMATUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = {
    "transistor": (SHARED / "mvtec", "transistor"),
    "magnetic_tile": (SHARED / "mtd", "magnetic_tile"),
    "kolektorsdd1": (SHARED / "more", "kolektorsdd1"),
    "bsdata_pitting": (SHARED / "more", "bsdata_pitting"),
    "loco_juice_bottle_logical": (SHARED / "more", "loco_juice_bottle_logical"),
    "elpv_mono": (SHARED / "more", "elpv_mono"),
}
FIRST_TWO = ["transistor", "magnetic_tile"]  # the categories of the tables committed before the other four arrived
NEGATIVES = SHARED / "natural" / "imagenet_samples"
RESULTS = Path(__file__).parent / "results"
ANOMATUNE = Path(sys.executable).parent / "anomatune"  # the command beside this Python
SQUARE = "256x256"  # anomalib's protocol (and these tables'): every image resized to a 256 px square


def dataset(name: str) -> tuple[Path, str]:
    """(root, category) of a benchmark dataset; exits with the reason when ../shared/data is absent."""
    root, category = DATASETS[name]
    if not (root / category).exists():
        sys.exit(f"{root / category} is absent: this benchmark needs ../shared/data beside the checkout")
    return root, category


def score_features(detector, features, size_hw, batch: int = 16):
    """Pixel maps and image scores of cached test features, through the pipeline's post-processing."""
    import torch

    from anomatune.pipeline.postprocess import PostProcessor
    from anomatune.pipeline.settings import PostprocessSettings

    post = PostProcessor(PostprocessSettings(), size_hw)
    maps, scores = zip(*(post(*detector.detect(chunk)) for chunk in torch.split(features, batch)))
    return torch.cat(maps).cpu().numpy(), torch.cat(scores).cpu().numpy()


def command_line() -> str:
    """The command that runs this benchmark as it was run, from the repository root: the line its results print."""
    return " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def run_record(rows: list) -> dict:
    """What a benchmark's JSON holds besides its rows: the command that wrote it and the machine."""
    import torch

    return {"command": command_line(),
            "machine": f"2-core CPU, {torch.get_num_threads()} torch threads", "rows": rows}  # fmt: skip


def markdown_page(title: str, data: dict, settings: str, header: tuple[str, ...], cells: list[tuple]) -> str:
    """A results page: the title, the command and machine with ``settings``, and one table row per ``cells`` entry."""
    lines = [f"# {title}", "", f"`{data['command']}` ({data['machine']}; {settings}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in cells] + [""])


def write_results(name: str, data: dict, markdown: str) -> None:
    """``results/NAME.json`` (strict: a value that does not apply is ``null``) and ``results/NAME.md``."""
    from anomatune.folders.base import json_text

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json_text(data))
    (RESULTS / f"{name}.md").write_text(markdown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(run: Path, *options: str, timeout: float = 120):
    """``anomatune serve RUN OPTIONS`` in its own process on a free port, once ``/health`` answers: yields the process
    and its URL, and stops it after."""
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [str(ANOMATUNE), "serve", str(run), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(
                    f"the server did not start: {server.stderr.read()[-500:] if server.poll() is not None else ''}"
                )
            time.sleep(0.2)
        yield server, url
    finally:
        server.terminate()
        server.wait(timeout=60)


@contextmanager
def features_once():
    """Every image's stage features computed once per extractor configuration (keyed by the backbone, its stages,
    pooling and aggregation, and the image's bytes), however many fits and scorings read them."""
    import hashlib

    import torch

    from anomatune.features.extractor import FeatureExtractor

    original = FeatureExtractor.stage_features
    cache: dict[tuple, torch.Tensor] = {}

    def cached(self, x):
        config = (self.backbone_name, self.weights_id, self.layers, self.pool, self.aggregation)
        keys = [(config, hashlib.sha1(image.numpy().tobytes()).hexdigest()) for image in x.cpu()]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            for i, features in zip(missing, original(self, x[missing])):
                cache[keys[i]] = features
        return torch.stack([cache[key] for key in keys])

    FeatureExtractor.stage_features = cached
    try:
        yield cache
    finally:
        FeatureExtractor.stage_features = original
