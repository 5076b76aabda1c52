"""Exported models (ONNX Runtime, TorchScript) compute what the pipeline computes."""

import json

import pytest
import torch
from PIL import Image

from anomatune import Pipeline, export, open_dataset
from anomatune.data.images import image_to_tensor, read_image
from anomatune.inference.export import sidecar

from ..conftest import FAST


def adaptor_weights(path):
    """The fast tests' random backbone with a fine-tuned-looking adaptor (a non-zero residual), as one weights file."""
    from safetensors.torch import save_file

    from anomatune.features import FeatureExtractor, create_backbone
    from anomatune.features.adaptor import PREFIX, Adaptor

    raw_dim = FeatureExtractor("test_efficientnet", backbone_weights="random").raw_dim
    adaptor = Adaptor(raw_dim, 4, seed=1)
    torch.nn.init.normal_(adaptor.up, std=0.1, generator=torch.Generator().manual_seed(2))
    state = create_backbone("test_efficientnet", weights="random").model.state_dict()
    save_file(state | {PREFIX + k: v.detach().contiguous() for k, v in adaptor.state_dict().items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "detector, adaptor", [({"name": "glad", "n_components": 2}, False), ("patchcore", False), ("padim", True)]
)
def test_exported_models_match_the_pipeline_at_any_batch_size(detector, adaptor, brick, tmp_path):
    import onnxruntime

    weights = {"backbone_weights": adaptor_weights(tmp_path / "adapted.safetensors")} if adaptor else {}
    Pipeline(detector=detector, device="cpu", **(FAST | weights)).fit(open_dataset(data=brick, category="brick")).save(
        tmp_path / "run"
    )
    onnx_path = export(tmp_path / "run", format="onnx", batch_size=2)
    script_path = export(tmp_path / "run", tmp_path / "elsewhere.pt", format="torchscript", batch_size=2)
    side = json.loads(sidecar(onnx_path).read_text())
    assert side["input"]["batch"] == "any" and side["threshold"] is not None and side["input"]["size_hw"] == [32, 32]
    pipeline = Pipeline.load(tmp_path / "run", device="cpu")
    assert (pipeline.extractor_.adaptor is not None) == adaptor
    paths = sorted((brick / "brick" / "test").rglob("*.png"))
    runners = {
        "onnx": lambda x: onnxruntime.InferenceSession(str(onnx_path)).run(None, {"image": x.numpy()}),
        "torchscript": lambda x: torch.jit.load(str(script_path))(x),
    }
    try:
        import openvino
    except ImportError:
        openvino = None
    if openvino is not None:
        xml_path = export(tmp_path / "run", format="openvino", batch_size=2)
        assert xml_path.name == "model.xml" and xml_path.with_suffix(".bin").is_file()
        compiled = openvino.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        runners["openvino"] = lambda x: tuple(compiled(x.numpy()).values())
    for n in (1, 3):  # traced with 2
        images = torch.stack([image_to_tensor(read_image(p), (32, 32)) for p in paths[:n]])
        maps, scores = pipeline.forward(images)
        normalised = (images - torch.tensor(side["input"]["mean"]).view(1, 3, 1, 1)) / torch.tensor(side["input"]["std"]).view(
            1, 3, 1, 1
        )
        scale = max(1.0, maps.abs().max().item())  # relative to the scores' magnitude
        for name, run in runners.items():
            got_maps, got_scores = (torch.as_tensor(v) for v in run(normalised))
            assert got_maps.shape == maps.shape and got_scores.shape == scores.shape, name
            assert (got_maps - maps).abs().max() <= 1e-4 * scale, name
            assert (got_scores - scores).abs().max() <= 1e-4 * scale, name


def sidecar_calibrated(calibration: dict, scores):
    """The sidecar's formula in NumPy alone, as an edge box without anomatune would compute it."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    body = np.interp(s, calibration["body_scores"], calibration["body_rates"])
    excess = np.maximum(s - calibration["tail_start"], 0) / calibration["tail_scale"]
    shape = calibration["tail_shape"]
    tail = calibration["tail_rate"] * (np.exp(-excess) if shape == 0 else (1 + shape * excess) ** (-1 / shape))
    rate = np.where(s >= calibration["tail_start"], tail, body)
    normalized = np.clip(np.log(rate) / (2 * np.log(calibration["rate_at_threshold"])), 0, 1)
    return rate, normalized


def test_the_sidecar_gives_an_edge_box_the_calibrated_scores_of_predict(brick, tmp_path):
    """From each export's sidecar alone (PIL and NumPy), ONNX Runtime and OpenVINO give predict's numbers."""
    import numpy as np
    import onnxruntime

    Pipeline(detector="padim", device="cpu", **FAST).fit(open_dataset(data=brick, category="brick")).save(tmp_path / "run")
    paths = sorted((brick / "brick" / "test").rglob("*.png"))
    expected = Pipeline.load(tmp_path / "run", device="cpu").predict(paths)
    onnx_path = export(tmp_path / "run", format="onnx")
    session = onnxruntime.InferenceSession(str(onnx_path))
    assert [o.name for o in session.get_outputs()] == ["maps", "scores"]
    assert session.get_outputs()[0].shape == ["batch", 32, 32] and session.get_outputs()[1].shape == ["batch"]
    runners = {onnx_path: lambda x: dict(zip(["maps", "scores"], session.run(None, {"image": x})))}
    try:
        import openvino
    except ImportError:
        openvino = None
    if openvino is not None:
        xml_path = export(tmp_path / "run", format="openvino")
        compiled = openvino.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        assert [o.get_names() for o in openvino.Core().read_model(str(xml_path)).outputs] == [{"maps"}, {"scores"}]
        runners[xml_path] = lambda x: {name: compiled(x)[compiled.output(name)] for name in ("maps", "scores")}
    assert sidecar(onnx_path).name == "model.onnx.json"
    for model, run in runners.items():
        side = json.loads(sidecar(model).read_text())
        assert side["model"] == model.name and side["version"] == "v1" and side["model_id"].endswith(side["digest"])
        assert "normalized" in side["calibration"]["formula"] and side["pixel_threshold"] is not None
        size = side["input"]["size_hw"]
        mean, std = np.array(side["input"]["mean"]).reshape(1, 3, 1, 1), np.array(side["input"]["std"]).reshape(1, 3, 1, 1)
        resample = {"bilinear": Image.Resampling.BILINEAR}[side["input"]["resize"]]
        pixels = np.stack(
            [np.asarray(Image.open(p).convert("RGB").resize(size[::-1], resample=resample), dtype=np.float32) for p in paths]
        )
        images = ((pixels.transpose(0, 3, 1, 2) / 255 - mean) / std).astype(np.float32)
        scores = np.asarray(run(images)["scores"], dtype=np.float64)
        rate, normalized = sidecar_calibrated(side["calibration"]["scores"], scores)
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-4, err_msg=model.name)
        np.testing.assert_allclose(normalized, expected.normalized, atol=1e-4, err_msg=model.name)
        np.testing.assert_allclose(rate, expected.false_alarm_rates, rtol=1e-3, err_msg=model.name)
        assert np.array_equal(scores > side["threshold"], expected.labels.astype(bool))
