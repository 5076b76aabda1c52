"""The settings of predict and export (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from ..schema import Settings, setting


@dataclass(frozen=True)
class PredictSettings(Settings):
    section = "predict"
    threshold: float | None = setting(
        None, "Decision threshold on the image score; default: the one the run learnt from held-out good images."
    )
    images: bool = setting(True, "Write each image's heatmap overlay and defect mask (PNG) beside the results.")


@dataclass(frozen=True)
class ExportSettings(Settings):
    section = "export"
    format: str = setting(
        "onnx",
        "Model format: onnx (ONNX Runtime and most engines), torchscript, or openvino (OpenVINO IR "
        "for Intel CPUs: pip install 'anomatune[openvino]').",
        choices=("onnx", "torchscript", "openvino"),
    )
    batch_size: int = setting(
        1, "Batch size of the example the model is traced with; the exported model takes any.", interval="[1, 4096]"
    )
