"""How ``anomatune serve`` listens, batches and computes (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting

RUNTIMES = ("torch", "onnx", "openvino")
API_KEY_ENV = "ANOMATUNE_API_KEY"


@dataclass(frozen=True)
class ServeSettings(Settings):
    section = "serve"
    host: str = setting(
        "127.0.0.1",
        "Address to listen on: this machine only by default; 0.0.0.0 opens the server to the network (then set --api-key).",
    )
    port: int = setting(8000, "Port to listen on.", interval="[1, 65535]")
    api_key: str | None = setting(
        None,
        f"Key every route but / and /health requires (header X-API-Key, or Authorization: Bearer), when set; "
        f"default: the {API_KEY_ENV} environment variable, else none (then anyone who reaches the server may use it).",
        metavar="KEY",
    )
    max_batch: int = setting(
        8, "Images of concurrent requests run in one forward pass, at most (1: no batching).", interval="[1, 1024]"
    )
    max_wait_ms: float = setting(
        5.0, "How long the first image of a batch waits for others, in milliseconds.", interval="[0, 10000]"
    )
    runtime: str = setting(
        "torch",
        "Engine: torch (eager), onnx (ONNX Runtime) or openvino (pip install 'anomatune[openvino]'); "
        "the run is exported at start-up.",
        choices=RUNTIMES,
    )
    max_side: int = setting(10000, "Largest image side accepted, in pixels (larger uploads get 413).", interval="[16, 100000]")
    max_request_mb: float = setting(
        100.0,
        "Largest request accepted, in MB, all its files together: a larger one gets 413 and the server stops reading it.",
        interval="(0, 100000]",
    )
    max_request_pixels: int = setting(
        256_000_000,
        "Decoded pixels a request may carry, all its images together (from their headers, before any is decoded): "
        "a larger one gets 413.",
        interval="[1, 10000000000]",
    )
    image_cache_mb: float = setting(
        256.0, "Memory for the overlays and masks of ?images=url, in MB (the oldest are dropped).", interval="[0, 1000000]"
    )
    watch: float = setting(
        0.0,
        "Seconds between checks of every served model for a new served version (fit, update, threshold or promote), "
        "loaded and swapped in without dropping a request; 0: never (POST /models/NAME/reload still does it).",
        interval="[0, 86400]",
    )
    drift_window: int = setting(
        500,
        "Recent scores per model whose drift from the calibration scores /metrics and /models report.",
        interval="[1, 1000000]",
    )
    drift_bound: float = setting(
        0.5,
        "KS statistic (0 to 1) of the recent scores against the calibration scores over which a warning is logged.",
        interval="(0, 1]",
    )
