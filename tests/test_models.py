import math

import pytest
import torch

from anomatune.errors import AnomatuneError
from anomatune.models.gmm import half_log_det_precision
from anomatune.models import DETECTORS, GLAD, GMM, PaDiM, PatchCore, create_detector, gaussian_blur, postprocess


def _features(n=24, d=6, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, h, w, generator=g)


SMALL = {"gmm": {"n_components": 3}, "glad": {"n_components": 3}, "padim": {}, "patchcore": {"coreset_ratio": 0.5}}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_outliers_score_higher_and_state_round_trips(name, tmp_path):
    from safetensors.torch import load_file, save_file

    train = _features()
    detector = create_detector(name, **SMALL[name]).fit(train)
    test = _features(n=2, seed=1)
    test[1, :, 1, 2] += 8.0  # one far-away patch
    maps = detector.anomaly_map(test)
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()
    assert maps[1, 1, 2] == maps.max()
    save_file(detector.state_dict(), str(tmp_path / "d.safetensors"))
    again = create_detector(name, **detector.config()).load_state_dict(load_file(str(tmp_path / "d.safetensors")))
    assert torch.allclose(again.anomaly_map(test), maps)
    pixel, scores = detector.predict(test, (32, 32))
    assert torch.allclose(pixel, postprocess(maps, (32, 32)))
    assert scores.shape == (2,) and scores[1] > scores[0]


def test_gmm_log_density_matches_scipy_mixture():
    from scipy.stats import multivariate_normal

    gmm = GMM(n_components=2).fit(_features(d=3))
    u = torch.randn(5, 3, dtype=torch.float64)
    s = gmm.state
    expected = torch.tensor([math.log(sum(
        s["weights"][k].item() * multivariate_normal(s["means"][k].numpy(), s["covariances"][k].numpy()).pdf(x.numpy())
        for k in range(2))) for x in u], dtype=torch.float64)
    assert torch.allclose(gmm.log_density(u), expected, atol=1e-8)


def test_gmm_em_improves_likelihood_and_is_seeded():
    f = _features(n=40, d=4)
    a, b = GMM(n_components=3, seed=5).fit(f), GMM(n_components=3, seed=5).fit(f)
    assert torch.equal(a.state["means"], b.state["means"])
    one_step = GMM(n_components=3, seed=5, max_iter=1).fit(f)
    x = f.permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert a.log_density(x).mean() >= one_step.log_density(x).mean() - 1e-9


@pytest.mark.parametrize("cls", [GMM, GLAD])
def test_gmm_collapsing_component_is_reseeded_never_nan(cls, caplog):
    x = torch.zeros(40, 3, 2, 2)
    x[:20] += 5.0  # two repeated points and three components: one must collapse
    with caplog.at_level("DEBUG", logger="anomatune.models.gmm"):
        gmm = cls(n_components=3).fit(x)
    assert any("collapsed and was re-seeded" in r.message for r in caplog.records)
    assert all(torch.isfinite(v).all() for v in gmm.state.values())
    assert torch.isfinite(gmm.anomaly_map(x)).all()


def test_online_update_follows_a_drifting_mean():
    g = torch.Generator().manual_seed(0)
    gmm = GMM(n_components=1).fit(torch.randn(50, 2, 2, 2, generator=g))
    for step in range(300):
        gmm.online_update(torch.randn(64, 2, generator=g, dtype=torch.float64) + torch.tensor([3.0, -2.0]), decay=0.95)
    assert torch.allclose(gmm.state["means"][0], torch.tensor([3.0, -2.0], dtype=torch.float64), atol=0.15)
    u = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    assert gmm.log_density(u) > gmm.log_density(torch.zeros(1, 2, dtype=torch.float64))


def test_glad_position_weights_localise_the_mixture():
    f = torch.zeros(30, 2, 1, 2)
    f[:, :, 0, 0] = torch.randn(30, 2) * 0.1 - 3  # left position always near -3
    f[:, :, 0, 1] = torch.randn(30, 2) * 0.1 + 3  # right position always near +3
    glad = GLAD(n_components=2, normalize=False).fit(f)
    swapped = f.flip(-1)[:2]  # each position now shows the other's content
    assert (glad.anomaly_map(swapped) > glad.anomaly_map(f[:2]) + 5).all()  # GLAD sees it
    gmm = GMM(n_components=2, normalize=False).fit(f)
    assert torch.allclose(gmm.anomaly_map(swapped), gmm.anomaly_map(f[:2]).flip(-1), atol=1e-6)  # a global GMM cannot
    assert torch.allclose(glad.state["position_weights"].sum(1), torch.ones(2, dtype=torch.float64))


def test_padim_log_density_and_distance_agree():
    padim = PaDiM().fit(_features())
    u = _features(n=1, seed=3)
    positions = torch.arange(16)
    d2 = padim.anomaly_map(u).flatten() ** 2
    logp = padim.log_density(u.flatten(2)[0].T, positions)
    log_det = half_log_det_precision(padim.state["prec_chol"])
    assert torch.allclose(logp, -0.5 * d2 + log_det - 3 * math.log(2 * math.pi), atol=1e-4)


def test_patchcore_coreset_and_reweighting():
    train = _features(n=10)
    core = PatchCore(coreset_ratio=0.25).fit(train)
    assert len(core.state["memory_bank"]) == 40
    full = PatchCore(coreset_ratio=1.0).fit(train)
    assert full.anomaly_map(train).max() < 5e-3  # every patch is in the bank (sqrt of rounding error)


def test_gaussian_blur_preserves_constants_and_mass():
    flat = torch.full((1, 20, 20), 3.0)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat)
    spike = torch.zeros(1, 41, 41)
    spike[0, 20, 20] = 1.0
    assert gaussian_blur(spike, 2.0).sum() == pytest.approx(1.0, abs=1e-5)


def test_errors_are_explained():
    with pytest.raises(AnomatuneError, match="unknown detector 'svm'"):
        create_detector("svm")
    with pytest.raises(AnomatuneError, match="not fitted"):
        GMM().anomaly_map(_features())
    bad = _features()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AnomatuneError, match="NaN"):
        PaDiM().fit(bad)
    padim = PaDiM().fit(_features())
    with pytest.raises(AnomatuneError, match="fitted on a 4x4 grid, got 2x2"):
        padim.anomaly_map(_features(h=2, w=2))


@pytest.mark.parametrize("name", ["gmm", "glad", "padim"])
def test_normalize_standardises_each_position(name):
    train = _features(n=40)
    train[:, :, 0, 0] *= 4.0  # one position whose good patches vary much more
    plain = create_detector(name, **SMALL[name], normalize=False).fit(train)
    normed = create_detector(name, **SMALL[name], normalize=True).fit(train)
    assert normed.config()["normalize"] is True and plain.config()["normalize"] is False
    train_maps = normed.anomaly_map(train)
    assert torch.allclose(train_maps.mean(0), torch.zeros(4, 4, dtype=train_maps.dtype), atol=1e-4)
    assert torch.allclose(train_maps.std(0), torch.ones(4, 4, dtype=train_maps.dtype), atol=1e-4)
    assert (train_maps.flatten(1).argmax(1) == 0).float().mean() < 0.3
    if name != "padim":  # a global density's noisy position dominates the plain maps of good images
        assert (plain.anomaly_map(train).flatten(1).argmax(1) == 0).float().mean() > 0.5
    with pytest.raises(AnomatuneError, match="fitted on a 4x4 grid, got 2x2"):
        normed.anomaly_map(_features(h=2, w=2))


@pytest.mark.parametrize("cls", [GMM, GLAD])
def test_component_holding_a_single_outlier_is_reseeded_never_nan(cls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 1, 1, generator=g)
    x[7] += 100.0  # k-means++ seeds a component on this lone patch, which then collapses
    detector = cls(n_components=2).fit(x)
    assert all(torch.isfinite(v).all() for v in detector.state.values() if v.is_floating_point())
    assert torch.isfinite(detector.anomaly_map(x)).all()
