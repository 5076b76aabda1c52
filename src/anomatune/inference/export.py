"""Export a fitted run as one model: backbone + detector + upsampling + smoothing.

The exported model takes a batch of images already normalised the backbone's way
(RGB, resized to the run's input size, scaled to [0, 1], minus ``mean``, divided by
``std``) and returns the pixel anomaly maps ``(B, H, W)`` and the image scores ``(B,)``:
the pipeline's own ``forward``, so the exported model and the command line cannot
disagree. The preprocessing, the decision thresholds and the calibration (the false-alarm rate and normalised score of
any output, in closed form: ``anomatune.calibration``) go in a side JSON beside it, so that an edge box computes the
same numbers without anomatune.
Every format takes any batch size: while traced, the detectors compute their chunked
loops in one piece (a traced loop would freeze the batch size).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..calibration import formula
from ..errors import AnomatuneError, RunFolderError
from ..folders.base import atomic_write, json_text, refuse_inside
from ..folders.kinds import RunFolder, open_run
from ..pipeline.pipeline import Pipeline
from .settings import ExportSettings

OUTPUTS = {  # the exported models' outputs, by the same names in every format
    "maps": "pixel anomaly map at the input size, higher = more anomalous",
    "scores": "image anomaly score",
}
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth"), "openvino": (".xml",)}  # what each format's --out may end in


class ScoringModel(nn.Module):
    """Normalised images → (pixel maps, image scores), exactly as the pipeline computes them."""

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self.pipeline = pipeline
        self.extractor = pipeline.extractor_.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = x * self.extractor.std + self.extractor.mean  # the extractor normalises [0, 1] images itself
        return self.pipeline.postprocessor_(*self.pipeline.detector_.detect(self.extractor(images)))


def preprocessing(pipeline: Pipeline) -> dict:
    extractor = pipeline.extractor_
    return {
        "batch": "any",
        "size_hw": list(pipeline.input_size),
        "resize": "bilinear",  # PIL's Image.resize(BILINEAR) of the whole image to size_hw (no crop)
        "aspect": "the whole image resized to size_hw, aspect ratio not kept, no crop, no padding",
        "color": "RGB (convert grayscale, RGBA and 16-bit images to 8-bit RGB first)",
        "layout": "NCHW float32",
        "scale": "pixel / 255",
        "mean": extractor.mean.flatten().tolist(),
        "std": extractor.std.flatten().tolist(),
    }


def export(run_dir, out=None, settings: ExportSettings | None = None, **changes) -> Path:
    """Write the run as ``model.onnx``, ``model.pt`` (TorchScript) or ``model.xml`` + ``.bin`` (OpenVINO),
    plus its sidecar ``<model file>.json`` beside it; return the model path.

    ``settings`` (or ``format=``, ``batch_size=``): see :class:`ExportSettings`. Without
    ``out`` the model goes into the run folder.
    """
    settings = (settings or ExportSettings()).updated(**changes)
    run = open_run(run_dir)
    if out is not None:
        suffixes = SUFFIXES[settings.format]
        if Path(out).suffix.lower() not in suffixes:
            raise AnomatuneError(
                f"--out {out}: a {settings.format} model is written as {' or '.join(suffixes)}; change the file name or --format"
            )
        refuse_inside(out, [run.model_path])  # without --out the model goes into the run, beside its own files
        if not Path(out).parent.is_dir():
            raise RunFolderError(f"folder {Path(out).parent} does not exist: create it or choose another --out")
    pipeline = Pipeline.load(run.path, device="cpu")
    model = ScoringModel(pipeline).eval()
    example = torch.zeros(settings.batch_size, 3, *pipeline.input_size)

    def write_onnx(tmp: str) -> None:
        torch.onnx.export(
            model,
            (example,),
            tmp,
            dynamo=False,
            opset_version=18,
            input_names=["image"],
            output_names=list(OUTPUTS),
            dynamic_axes={"image": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
        )
        name_dimensions(tmp, pipeline.input_size)

    target = run / RunFolder.MODELS[settings.format] if out is None else Path(out)

    def write_model(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks evaluated once
            if settings.format == "onnx":
                write_onnx(tmp)
            elif settings.format == "openvino":
                write_openvino(write_onnx, tmp, target)
            else:
                torch.jit.trace(model, example, check_trace=False).save(tmp)

    config = pipeline.config()
    side = {
        "anomatune_version": config.anomatune_version,
        "format": settings.format,
        "input": preprocessing(pipeline),
        "outputs": {
            name: {"shape": ["batch", *pipeline.input_size] if name == "maps" else ["batch"], "meaning": meaning}
            for name, meaning in OUTPUTS.items()
        },
        "threshold": pipeline.threshold,
        "pixel_threshold": config.fitted.pixel_threshold,
        "calibration": {
            "formula": formula(),
            "scores": pipeline.image_calibration.to_dict() if pipeline.image_calibration else None,
            "maps": pipeline.pixel_calibration.to_dict() if pipeline.pixel_calibration else None,
        },
        "detector": config.settings.detector.name,
        "backbone": config.settings.features.backbone,
        "weights_id": config.fitted.weights_id,
        "model_id": pipeline.model_id_,
        "version": pipeline.version_,
        "digest": pipeline.model_id_.rpartition("@")[2],
    }
    if out is None:
        with run.lock():
            path = run.write_with(RunFolder.MODELS[settings.format], write_model)
            run.write_json(sidecar(path).name, side | {"model": path.name})
        return path
    path = target
    atomic_write(path, write_model)
    atomic_write(sidecar(path), lambda tmp: Path(tmp).write_text(json_text(side | {"model": path.name}), encoding="utf-8"))
    return path


def name_dimensions(path: str, size_hw: tuple[int, int]) -> None:
    """The outputs' shapes as the sidecar states them, (batch, H, W) and (batch,): the tracer leaves the maps' height
    and width symbolic, named after whatever node computed them."""
    import onnx

    model = onnx.load(path)
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        for dim, value in zip(dims[1:], size_hw):
            dim.dim_value = value
    onnx.save(model, path)


def sidecar(model: Path) -> Path:
    """The JSON beside an exported model, named after its file (``model.onnx.json``): one per export."""
    return model.with_name(f"{model.name}.json")


def write_openvino(write_onnx, xml_path: str, target: Path) -> None:
    """OpenVINO IR converted from the ONNX export into ``xml_path`` (a temporary name of ``target``):
    the weights are moved beside ``target`` first, the graph is renamed into place last, so a
    reader never finds a graph without its weights."""
    try:
        import openvino
    except ImportError:
        raise AnomatuneError("--format openvino needs OpenVINO: pip install 'anomatune[openvino]'") from None
    with tempfile.TemporaryDirectory(dir=Path(xml_path).parent) as folder:
        onnx_path = Path(folder) / "model.onnx"
        write_onnx(str(onnx_path))
        converted = Path(folder) / "model.xml"
        model = openvino.convert_model(str(onnx_path))
        for output, name in zip(model.outputs, OUTPUTS):  # ONNX's output names, not the last node's
            output.get_tensor().set_names({name})
        openvino.save_model(model, str(converted), compress_to_fp16=False)
        os.replace(converted.with_suffix(".bin"), RunFolder.openvino_weights(target))
        os.replace(converted, xml_path)
