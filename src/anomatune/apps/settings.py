"""The settings of single commands: predict, export, color-transfer and the demo (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.images import DEFAULT_IMAGE_SIZE
from ..schema import Settings, setting


@dataclass(frozen=True)
class PredictSettings(Settings):
    section = "predict"
    threshold: float | None = setting(None, "Decision threshold on the image score; default: the one the run learnt from held-out good images.")
    images: bool = setting(True, "Write each image's heatmap overlay and defect mask (PNG) beside the results.")


@dataclass(frozen=True)
class ExportSettings(Settings):
    section = "export"
    format: str = setting("onnx", "Model format: onnx (ONNX Runtime and most engines), torchscript, or openvino (OpenVINO IR "
                                  "for Intel CPUs: pip install 'anomatune[openvino]').", choices=("onnx", "torchscript", "openvino"))
    batch_size: int = setting(1, "Batch size of the example the model is traced with; the exported model takes any.",
                              interval="[1, 4096]")


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
