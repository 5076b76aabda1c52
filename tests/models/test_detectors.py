"""Detectors: outliers score higher, saved state round-trips, densities against SciPy, EM, online updates,
GLAD's localisation, PaDiM's density, PatchCore's coreset, normalisation, and the errors users meet."""

import math

import pytest
import torch

from anomatune.errors import AnomatuneError, NotFittedError, SettingsError
from anomatune.models import DETECTORS, GLAD, GMM, DensityModel, PaDiM, PatchCore, create_detector
from anomatune.models.gmm import half_log_det_precision


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
    again = create_detector(detector.settings).load_state_dict(load_file(str(tmp_path / "d.safetensors")))
    assert torch.allclose(again.anomaly_map(test), maps)
    patch_maps, scores = detector.detect(test)
    assert torch.equal(patch_maps, maps)
    if name == "patchcore":  # its own image score: the reweighted distance of the most anomalous patch
        assert scores.shape == (2,) and scores[1] > scores[0]
    else:
        assert scores is None  # the pipeline scores by the maximum of the smoothed map


def test_gmm_log_density_matches_scipy_mixture():
    from scipy.stats import multivariate_normal

    gmm = GMM(n_components=2).fit(_features(d=3))
    u = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.tensor(
        [
            math.log(
                sum(
                    gmm.weights_[k].item()
                    * multivariate_normal(gmm.means_[k].numpy(), gmm.covariances_[k].numpy()).pdf(x.numpy())
                    for k in range(2)
                )
            )
            for x in u
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(gmm.log_density(u), expected, atol=1e-8)


def test_gmm_em_improves_likelihood_and_is_seeded():
    f = _features(n=40, d=4)
    a, b = GMM(n_components=3, seed=5).fit(f), GMM(n_components=3, seed=5).fit(f)
    assert torch.equal(a.means_, b.means_) and a.n_iter_ >= 1
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
    assert all(torch.isfinite(v).all() for v in gmm.state_dict().values())
    assert torch.isfinite(gmm.anomaly_map(x)).all()


def test_online_update_follows_a_drifting_mean():
    g = torch.Generator().manual_seed(0)
    gmm = GMM(n_components=1).fit(torch.randn(50, 2, 2, 2, generator=g))
    for _ in range(300):
        gmm.online_update(torch.randn(64, 2, generator=g, dtype=torch.float64) + torch.tensor([3.0, -2.0]), None, decay=0.95)
    assert torch.allclose(gmm.means_[0], torch.tensor([3.0, -2.0], dtype=torch.float64), atol=0.15)
    assert set(GMM.online_state) <= set(gmm.state_dict())  # the online statistics are saved with it (fine-tuning checkpoints)
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
    assert torch.allclose(glad.position_weights_.sum(1), torch.ones(2, dtype=torch.float64))


def test_padim_log_density_and_distance_agree():
    padim = PaDiM().fit(_features())
    u = _features(n=1, seed=3)
    positions = torch.arange(16)
    d2 = padim.anomaly_map(u).flatten() ** 2
    logp = padim.log_density(u.flatten(2)[0].T, positions)
    log_det = half_log_det_precision(padim.prec_chol_)
    assert torch.allclose(logp, -0.5 * d2 + log_det - 3 * math.log(2 * math.pi), atol=1e-4)


def test_patchcore_coreset_and_reweighting():
    train = _features(n=10)
    core = PatchCore(coreset_ratio=0.25).fit(train)
    assert len(core.memory_bank_) == 40
    full = PatchCore(coreset_ratio=1.0).fit(train)
    assert full.anomaly_map(train).max() < 5e-3  # every patch is in the bank (sqrt of rounding error)


def test_padim_streamed_fit_is_each_positions_sample_gaussian():
    train = _features(n=12) * 10 + 50  # far from zero: the running sums must stay accurate
    padim = PaDiM(ridge=0.01).fit_batches(iter(torch.split(train, 5)), n_images=12)
    x = train.flatten(2).permute(2, 0, 1).double()  # (P, N, D)
    for p in (0, 7, 15):
        cov = torch.cov(x[p].T) + 0.01 * torch.eye(train.shape[1], dtype=torch.float64)
        prec = torch.linalg.inv(cov)
        assert torch.allclose(padim.means_[p].double(), x[p].mean(0), atol=1e-4)
        chol = padim.prec_chol_[p].double()
        assert torch.allclose(chol @ chol.T, prec, rtol=1e-3, atol=1e-3)
    assert torch.allclose(PaDiM(ridge=0.01).fit(train).prec_chol_, padim.prec_chol_, atol=1e-5)


def test_patchcore_streamed_fit_keeps_a_bounded_sample_and_equals_the_in_memory_fit():
    train = _features(n=10)  # 160 patches
    batches = list(torch.split(train, 3))
    whole = PatchCore(coreset_ratio=0.5, max_patches=50).fit(train)
    streamed = PatchCore(coreset_ratio=0.5, max_patches=50).fit_batches(iter(batches), n_images=10)
    assert len(whole.memory_bank_) == len(streamed.memory_bank_) == 25  # half of the 50 kept, not of the 160
    assert torch.equal(whole.memory_bank_, streamed.memory_bank_)
    assert tuple(streamed.grid_.tolist()) == (4, 4) and int(streamed.n_features_) == train.shape[1]
    bank_rows = {tuple(r.tolist()) for r in streamed.memory_bank_}
    assert bank_rows <= {tuple(r.tolist()) for r in train.permute(0, 2, 3, 1).reshape(-1, train.shape[1])}
    unbounded = PatchCore(coreset_ratio=0.5, max_patches=None).fit_batches(iter(batches), n_images=10)
    assert torch.equal(unbounded.memory_bank_, PatchCore(coreset_ratio=0.5, max_patches=None).fit(train).memory_bank_)
    assert len(unbounded.memory_bank_) == 80
    with pytest.raises(AnomatuneError, match="no features"):
        PatchCore().fit_batches(iter([]), n_images=0)


def test_errors_are_explained():
    with pytest.raises(SettingsError, match="unknown detector 'svm'"):
        create_detector("svm")
    with pytest.raises(NotFittedError, match="not fitted: call fit"):
        GMM().anomaly_map(_features())
    with pytest.raises(NotFittedError, match="not fitted"):
        PaDiM().log_density(torch.zeros(2, 6), torch.arange(2))
    bad = _features()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(AnomatuneError, match="NaN"):
        PaDiM().fit(bad)
    padim = PaDiM().fit(_features())
    with pytest.raises(AnomatuneError, match="fitted on a 4x4 grid, got 2x2"):
        padim.anomaly_map(_features(h=2, w=2))
    for detector in (padim, GLAD(n_components=2).fit(_features())):  # other layers: said so, not "image size"
        with pytest.raises(
            AnomatuneError, match="fitted on 6-d patch features, got 4-d: the feature layers or projection differ"
        ):
            detector.anomaly_map(_features(d=4))
    with pytest.raises(AnomatuneError, match="does not fit a glad detector .*missing position_weights.*refit"):
        GLAD().load_state_dict(GMM(n_components=2).fit(_features()).state_dict())
    with pytest.raises(AnomatuneError, match="PaDiM takes PaDiMSettings, not GMMSettings"):
        PaDiM(GMM().settings)


def test_every_detector_can_guide_the_finetuning():
    assert {name for name, cls in DETECTORS.items() if issubclass(cls, DensityModel)} == set(DETECTORS)
    assert isinstance(GLAD(), DensityModel) and isinstance(PatchCore(), DensityModel)


def test_patchcore_soft_knn_density_and_its_online_step_by_hand():
    bank = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    core = PatchCore(coreset_ratio=1.0).fit(bank.T.reshape(1, 2, 1, 3))  # one image of three patches: all kept
    assert torch.equal(core.memory_bank_, bank)
    h = 3.0  # each bank patch's nearest other: 3, 3 and 4; their median
    assert core.bandwidth() == pytest.approx(h)
    u = torch.tensor([[1.0, 1.0]], requires_grad=True)
    d2 = torch.tensor([2.0, 5.0, 10.0])
    expected = torch.logsumexp(-d2 / (2 * h**2), 0) - math.log(3)
    log_density = core.log_density(u)
    assert log_density.item() == pytest.approx(expected.item(), abs=1e-5)
    log_density.sum().backward()  # ∇ = Σ_j w_j (m_j − u) / h², w = softmax(−d²/2h²)
    weights = torch.softmax(-d2 / (2 * h**2), 0)
    grad = (weights[:, None] * (core.memory_bank_ - u.detach())).sum(0) / h**2
    assert torch.allclose(u.grad[0], grad, atol=1e-5)
    core.online_update(torch.tensor([[0.5, 0.0], [0.0, 0.5], [3.0, 1.0]]), None, decay=0.75)  # nearest: 0, 0, 1
    assert torch.allclose(core.memory_bank_, torch.tensor([[0.0625, 0.0625], [3.0, 0.25], [0.0, 4.0]]))


def test_refitting_forgets_the_previous_fit():
    gmm = GMM(n_components=1).fit(_features())
    gmm.online_update(torch.randn(8, 6, dtype=torch.float64), None, decay=0.5)
    assert "s0" in gmm.state_dict()
    assert "s0" not in gmm.fit(_features()).state_dict()


@pytest.mark.parametrize("name", ["gmm", "glad", "padim"])
def test_normalize_standardises_each_position(name):
    train = _features(n=40)
    train[:, :, 0, 0] *= 4.0  # one position whose good patches vary much more
    plain = create_detector(name, **SMALL[name], normalize=False).fit(train)
    normed = create_detector(name, **SMALL[name], normalize=True).fit(train)
    assert normed.settings.normalize is True and plain.settings.normalize is False
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
    assert all(torch.isfinite(v).all() for v in detector.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(detector.anomaly_map(x)).all()


def test_greedy_coreset_takes_one_patch_of_each_far_cluster():
    from anomatune.models.patchcore import greedy_coreset

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 40, generator=generator) * 100
    x = (centres[:, None] + torch.randn(6, 50, 40, generator=generator)).reshape(300, 40)
    chosen = greedy_coreset(x, 6, proj_dim=16, seed=0)
    assert sorted((chosen // 50).tolist()) == list(range(6))  # k-center: every cluster covered once


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines)")


@needs_cuda
@pytest.mark.parametrize("name", list(DETECTORS))
def test_fit_on_cuda_matches_the_cpu(name):
    """Every tensor a fit creates follows the features' device, the collapsing component's path included, and the
    seeded draws are the CPU's: the same model on either device."""
    x = torch.zeros(40, 3, 2, 2)
    x[:20] += 5.0
    x += 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    cpu = create_detector(name, **SMALL[name]).fit(x)
    cuda = create_detector(name, **SMALL[name]).fit(x.cuda())
    assert torch.allclose(cuda.anomaly_map(x.cuda()).cpu(), cpu.anomaly_map(x), rtol=1e-3, atol=1e-3)
