"""Where a command's work runs: this process, or a Ray cluster (torch-free, Ray-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting

LOCAL, RAY = "local", "ray"


@dataclass(frozen=True)
class EngineSettings(Settings):
    """The engine of predict, fit, finetune and evaluate: never changes their results beyond float rounding."""

    section = "engine"
    engine: str = setting(
        LOCAL,
        "local: this process; ray: a Ray cluster (pip install 'anomatune[ray]'): an actor pool for "
        "predict, one task per category for --category all.",
        choices=(LOCAL, RAY),
    )
    address: str | None = setting(
        None,
        "Ray cluster to join with --engine ray (auto, or ray://HEAD:10001); default: start Ray "
        "on this machine with all its CPUs and GPUs.",
        metavar="ADDR",
    )
    workers: int | None = setting(
        None,
        "With --engine ray: actors (predict) or categories (fit, finetune, evaluate) at once; "
        "default: one per GPU when the cluster has GPUs, else one per CPU (predict) or "
        "one per 2 CPUs (categories).",
        interval="[1, 4096]",
    )

    def check(self) -> list[str]:
        if self.engine != RAY and (self.address or self.workers):
            return ["--address and --workers go with --engine ray"]
        return []
