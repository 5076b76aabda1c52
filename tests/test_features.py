import pytest
import torch
from safetensors.torch import load_file, save_file

from anomatune.backbones import create_backbone
from anomatune.errors import AnomatuneError, BackboneError
from anomatune.features import FeatureExtractor


@pytest.fixture(scope="module")
def lite0():
    return FeatureExtractor("efficientnet_lite0")


@pytest.mark.parametrize(
    "name, dim",
    [("efficientnet_lite0", 152), ("efficientnet_lite1", 152), ("efficientnet_lite2", 168), ("dinov2_vits14", 768)],
)
def test_shapes_on_a_stride_8_grid(name, dim):
    if name == "dinov2_vits14":
        pytest.importorskip("onnx", reason="dinov2_vits14 is the optional extra 'dinov2'")
    extractor = FeatureExtractor(name)
    with torch.no_grad():
        out = extractor(torch.rand(2, 3, 128, 96))
    assert out.shape == (2, dim, 16, 12)
    assert extractor.out_dim == dim


def test_same_input_same_features_and_batch_independence(lite0):
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a, b, single = lite0(x), lite0(x), lite0(x[1:2])
    assert torch.equal(a, b)
    assert torch.allclose(a[1:2], single, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_the_first_conv():
    extractor = FeatureExtractor("efficientnet_lite0", proj_dim=16)
    extractor.train()
    extractor(torch.rand(2, 3, 64, 64)).square().mean().backward()
    grad = extractor.model.conv_stem.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_later_stages_are_dropped():
    extractor = FeatureExtractor("efficientnet_lite0", layers=(2,))
    assert len(extractor.model.blocks) == 3  # stride-8 stage is blocks.2; blocks 3-6 and the head are gone
    assert not hasattr(extractor.model, "conv_head") or isinstance(extractor.model.conv_head, torch.nn.Identity)


def test_batchnorm_statistics_frozen_in_training():
    extractor = FeatureExtractor("efficientnet_lite0", layers=(1,))
    extractor.train()
    bn = extractor.model.bn1
    before = bn.running_mean.clone()
    extractor(torch.rand(4, 3, 32, 32) * 5)
    assert not bn.training and torch.equal(bn.running_mean, before)
    unfrozen = FeatureExtractor("efficientnet_lite0", layers=(1,), freeze_batchnorm=False).train()
    unfrozen(torch.rand(4, 3, 32, 32) * 5)
    assert not torch.equal(unfrozen.model.bn1.running_mean, before)


def test_pooling_averages_neighbours(lite0):
    raw = FeatureExtractor(create_backbone("efficientnet_lite0"), pool=1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        unpooled, pooled = raw(x), lite0(x)
    assert torch.allclose(pooled[..., 3, 3], unpooled[..., 2:5, 2:5].mean((-1, -2)), atol=1e-5)


def test_pca_projection_fitted_once_and_saved(tmp_path):
    extractor = FeatureExtractor("efficientnet_lite0", proj_dim=8, proj="pca")
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(AnomatuneError, match="PCA projection is not fitted"):
        extractor(x)
    extractor.fit_projection([x, {"image": torch.rand(2, 3, 64, 64)}])
    weight = extractor.proj_weight.clone()
    assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-4)  # orthonormal components
    extractor.train()
    extractor(x).sum().backward()
    assert torch.equal(extractor.proj_weight, weight) and extractor.proj_weight.grad is None
    with torch.no_grad():
        feats = extractor.eval()(x)
    # projected features are centred on the fitting data: variance concentrated in the first component
    assert feats.var((0, 2, 3))[0] >= feats.var((0, 2, 3))[-1]
    save_file({k: v for k, v in extractor.state_dict().items() if k.startswith("proj_")}, str(tmp_path / "proj.safetensors"))
    fresh = FeatureExtractor("efficientnet_lite0", proj_dim=8, proj="pca")
    fresh.load_state_dict(load_file(str(tmp_path / "proj.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), feats, atol=1e-5)


def test_random_projection_is_seeded():
    a = FeatureExtractor("efficientnet_lite0", proj_dim=8, seed=3)
    b = FeatureExtractor("efficientnet_lite0", proj_dim=8, seed=3)
    assert torch.equal(a.proj_weight, b.proj_weight)


def test_bad_settings_are_explained():
    with pytest.raises(BackboneError, match=r"layers \[7\] not available .*2 \(stride 8, 40 ch\)"):
        FeatureExtractor("efficientnet_lite0", layers=(7,))
    with pytest.raises(AnomatuneError, match="proj_dim must be in 1..152"):
        FeatureExtractor("efficientnet_lite0", proj_dim=500)
    with pytest.raises(AnomatuneError, match="pool must be a positive odd number"):
        FeatureExtractor("efficientnet_lite0", pool=2)
    with pytest.raises(AnomatuneError, match=r"expected an image batch \(B, 3, H, W\)"):
        FeatureExtractor("efficientnet_lite0")(torch.rand(3, 64, 64))
