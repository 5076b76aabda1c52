"""The settings of the commands that are only command line: color-transfer and the demo (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.settings import DEFAULT_IMAGE_SIZE
from ..schema import Settings, setting


@dataclass(frozen=True)
class ColorTransferSettings(Settings):
    section = "color_transfer"
    rho: tuple[float, ...] = setting((0.5, 0.75, 1.0), "Transfer strengths, one column each: --rho 0.5 0.75 1.")
    size: int = setting(DEFAULT_IMAGE_SIZE, "Images are resized to this square side.", interval="[16, 4096]")

    def check(self) -> list[str]:
        if not self.rho or any(not 0 <= r <= 1 for r in self.rho):
            return [f"each rho must be in [0, 1], got {list(self.rho)}"]
        return []


@dataclass(frozen=True)
class DemoSettings(Settings):
    section = "demo"
    steps: int = setting(40, "Fine-tuning steps (short: it is a demo).", interval="[1, 100000]")
