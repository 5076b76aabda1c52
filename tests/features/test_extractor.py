"""Patch features: shapes, batch independence, gradients, pruning, frozen batch norm, pooling, projections."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from anomatune.errors import AnomatuneError, BackboneError, SettingsError
from anomatune.features import FeatureExtractor, FeatureSettings

FAST = {"backbone": "test_efficientnet", "backbone_weights": "random"}  # random weights from a fixed seed: fast, reproducible


def fast(**changes) -> FeatureExtractor:
    return FeatureExtractor(FeatureSettings(**FAST, **changes))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dim", [("efficientnet_lite0", 152), ("efficientnet_lite1", 152), ("efficientnet_lite2", 168), ("dinov2_vits14", 768)]
)
def test_packaged_backbones_give_a_stride_8_grid(name, dim):
    if name == "dinov2_vits14":
        pytest.importorskip("onnx", reason="dinov2_vits14 is the optional extra 'dinov2'")
    extractor = FeatureExtractor(name)
    with torch.no_grad():
        out = extractor(torch.rand(2, 3, 128, 96))
    assert out.shape == (2, dim, 16, 12) and (extractor.proj_dim or extractor.raw_dim) == dim


def test_shapes_and_batch_independence():
    extractor = fast()
    x = torch.rand(3, 3, 64, 48)
    with torch.no_grad():
        a, b, single = extractor(x), extractor(x), extractor(x[1:2])
    assert a.shape == (3, 80, 8, 6) and torch.equal(a, b)
    assert torch.allclose(a[1:2], single, rtol=1e-4, atol=1e-4)


def test_extract_gathers_batches_on_the_cpu():
    extractor = fast()
    x = torch.rand(5, 3, 32, 32)
    out = extractor.extract(torch.split(x, 2))
    with torch.no_grad():
        assert torch.allclose(out, extractor(x), atol=1e-5)
    assert extractor.extract([{"image": x}], raw=True).shape == (5, 80, 4, 4)
    with pytest.raises(AnomatuneError, match="no images"):
        extractor.extract([])


def test_gradient_reaches_the_first_conv():
    extractor = fast(proj_dim=16, proj="random")
    extractor.train()
    extractor(torch.rand(2, 3, 32, 32)).square().mean().backward()
    grad = extractor.model.conv_stem.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_later_stages_are_dropped():
    extractor = fast(layers=(2,))
    assert len(extractor.model.blocks) == 3  # the stride-8 stage is blocks.2; later blocks and the head are gone


def test_batchnorm_statistics_frozen_in_training():
    extractor = fast(layers=(1,))
    extractor.train()
    bn = extractor.model.bn1
    before = bn.running_mean.clone()
    extractor(torch.rand(4, 3, 32, 32) * 5)
    assert not bn.training and torch.equal(bn.running_mean, before)
    unfrozen = FeatureExtractor(FeatureSettings(**FAST, layers=(1,)), freeze_batchnorm=False).train()
    unfrozen(torch.rand(4, 3, 32, 32) * 5)
    assert not torch.equal(unfrozen.model.bn1.running_mean, before)


def test_pooling_averages_neighbours():
    raw, pooled = fast(pool=1), fast()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        unpooled, smooth = raw(x), pooled(x)
    assert torch.allclose(smooth[..., 3, 3], unpooled[..., 2:5, 2:5].mean((-1, -2)), atol=1e-5)


def test_stage_aggregation_pools_each_stage_with_a_zero_border_then_upsamples():
    import torch.nn.functional as F

    extractor = fast(aggregation="stage")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got = extractor(x)
        maps = extractor.stage_maps(x)
    pooled = [F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True) for m in maps]
    size = max(tuple(m.shape[-2:]) for m in pooled)
    expected = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in pooled], 1)
    torch.testing.assert_close(got, expected)
    corner = pooled[0][0, :, 0, 0]
    torch.testing.assert_close(corner, maps[0][0, :, :2, :2].sum((-1, -2)) / 9)  # the border counts zeros


def test_aggregation_auto_is_the_detectors_choice():
    from anomatune import Pipeline

    assert Pipeline(detector="patchcore").settings.features.aggregation == "stage"
    assert Pipeline(detector="padim").settings.features.aggregation == "concat"
    assert Pipeline(detector="patchcore", aggregation="concat").settings.features.aggregation == "concat"


def test_pca_projection_fitted_once_and_saved(tmp_path):
    extractor = fast(proj_dim=8, proj="pca")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(AnomatuneError, match="PCA projection is not fitted"):
        extractor(x)
    y = torch.rand(2, 3, 32, 32)
    extractor.fit_projection([x, {"image": y}])
    weight = extractor.proj_weight.clone()
    from_features = fast(proj_dim=8, proj="pca").fit_projection_on(extractor.extract([x, y], raw=True))  # one pass, same PCA
    assert torch.equal(from_features.proj_weight, weight) and torch.equal(from_features.proj_mean, extractor.proj_mean)
    assert torch.allclose(weight @ weight.T, torch.eye(8), atol=1e-4)  # orthonormal components
    extractor.train()
    extractor(x).sum().backward()
    assert torch.equal(extractor.proj_weight, weight) and extractor.proj_weight.grad is None
    with torch.no_grad():
        feats = extractor.eval()(x)
    assert feats.var((0, 2, 3))[0] >= feats.var((0, 2, 3))[-1]  # variance concentrated in the first component
    save_file({k: v for k, v in extractor.state_dict().items() if k.startswith("proj_")}, str(tmp_path / "proj.safetensors"))
    fresh = fast(proj_dim=8, proj="pca")
    fresh.load_state_dict(load_file(str(tmp_path / "proj.safetensors")), strict=False)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), feats, atol=1e-5)


def test_random_projection_is_seeded():
    a = FeatureExtractor(FeatureSettings(**FAST, proj_dim=8, proj="random"), seed=3)
    b = FeatureExtractor(FeatureSettings(**FAST, proj_dim=8, proj="random"), seed=3)
    assert torch.equal(a.proj_weight, b.proj_weight)


def test_auto_projection_is_a_pca_only_when_it_reduces():
    assert fast(proj_dim=8).proj == "pca" and fast(proj_dim=8).proj_dim == 8  # auto with a dimension: PCA
    assert fast(proj_dim=500).proj_dim is None  # auto, not below the 80 dimensions: none


def test_proj_none_keeps_every_feature_whatever_the_detector():
    assert fast(proj="none").proj_dim is None and fast(proj="none")(torch.rand(1, 3, 64, 64)).shape[1] == 80
    with pytest.raises(SettingsError, match="--proj none keeps every feature: drop --proj-dim 8"):
        fast(proj="none", proj_dim=8)


def test_imagenet_normalization_replaces_the_backbones_statistics():
    from anomatune.features.backbones import IMAGENET_MEAN, IMAGENET_STD

    lite = FeatureExtractor("efficientnet_lite0", normalization="imagenet")  # its own statistics: mean = std = 0.5
    assert lite.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert lite.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    assert FeatureExtractor("efficientnet_lite0").mean.flatten().tolist() == [0.5, 0.5, 0.5]


def test_bad_settings_are_explained():
    with pytest.raises(BackboneError, match=r"layers \[7\] not available .*2 \(stride 8, 32 ch\)"):
        fast(layers=(7,))
    with pytest.raises(AnomatuneError, match="proj_dim must be in 1..80"):
        fast(proj_dim=500, proj="pca")
    with pytest.raises(SettingsError, match="pool must be odd"):
        fast(pool=2)
    with pytest.raises(AnomatuneError, match=r"expected an image batch \(B, 3, H, W\)"):
        fast()(torch.rand(3, 64, 64))
