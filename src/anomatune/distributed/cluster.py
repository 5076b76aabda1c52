"""Joining (or starting) a Ray cluster, and how many workers of what size it holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..device import parse_device
from ..errors import AnomatuneError

log = logging.getLogger(__name__)


def connect(address: str | None = None):
    """The ``ray`` module, connected: to ``address``, to a cluster this process already joined
    (a test's ``ray.init(num_cpus=2)``), or to a new one on this machine."""
    try:
        import ray
    except ImportError:
        raise AnomatuneError("--engine ray needs Ray: pip install 'anomatune[ray]'") from None
    if not ray.is_initialized():
        options = {"address": address} if address else {"include_dashboard": False}
        try:
            ray.init(logging_level=logging.WARNING, **options)
        except ConnectionError as exc:
            raise AnomatuneError(f"cannot join the Ray cluster at {address}: {exc}") from None
        log.info(
            "Ray cluster: %s", ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items()) if k in ("CPU", "GPU"))
        )
    return ray


@dataclass(frozen=True)
class WorkerPlan:
    """``workers`` Ray workers, each with ``cpus`` CPUs (and one GPU when ``device`` is cuda)."""

    workers: int
    cpus: float
    device: str

    @property
    def ray_args(self) -> dict:
        return {"num_cpus": self.cpus, "num_gpus": 1 if self.device == "cuda" else 0}


def plan_workers(ray, workers: int | None, device: str, cpus_per_worker: int = 1) -> WorkerPlan:
    """GPUs when the cluster has them and ``device`` allows (one worker each); else CPU workers
    sharing the cluster's CPUs (``cpus_per_worker`` each by default)."""
    device = parse_device(device)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise AnomatuneError("--device cuda, but the Ray cluster has no GPU: use --device auto or cpu")
    if device not in ("auto", "cpu", "cuda"):
        raise AnomatuneError(f"--device {device} cannot be spread over Ray workers: use auto, cpu or cuda")
    if device != "cpu" and gpus:
        return WorkerPlan(workers or gpus, 1, "cuda")
    workers = workers or max(1, cpus // cpus_per_worker)
    return WorkerPlan(workers, cpus / workers if workers > cpus else cpus // workers, "cpu")
