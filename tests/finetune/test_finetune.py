"""Fine-tuning: closed-form gradients, the outlier filter, online models, the loop, resume, NaN stop, outputs."""

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from anomatune import Pipeline, build_report, evaluate
from anomatune.errors import AnomatuneError, RunFolderError
from anomatune.features.backbones import create_backbone
from anomatune.finetune import Finetuner, FinetuneSettings, dry_run, finetune
from anomatune.finetune.loss import MixtureLoss, auto_temperature, boundary_log_density, keep_negatives
from anomatune.folders.kinds import FinetuneFolder
from anomatune.models import GMM, PaDiM

from ..conftest import FAST
from .conftest import finetune_killed_at_step_3, tiny_settings


@pytest.fixture(scope="module")
def gmm64():
    """A float64 GMM with 3 full-covariance components in 3 dimensions."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]], dtype=torch.float64)
    x = torch.cat(
        [
            c
            + torch.randn(300, 3, generator=g, dtype=torch.float64)
            @ torch.diag(torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
            for c in centres
        ]
    )
    gmm = GMM(n_components=3, ridge=0.01, normalize=False).fit(x.float().T.reshape(1, 3, 30, 30))
    return gmm.load_state_dict({k: (v.double() if v.is_floating_point() else v) for k, v in gmm.state_dict().items()})


def _h(gmm, u):
    """Eq. 16: h(u) = −Σ_k Σ_k⁻¹ (u − μ_k) P(k | u)."""
    precision = torch.linalg.inv(gmm.covariances_)
    resp = torch.softmax(gmm.component_log_prob(u), dim=1)
    pulls = torch.einsum("kde,nke->nkd", precision, u[:, None, :] - gmm.means_[None])
    return -(pulls * resp[..., None]).sum(1)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradients_match_the_closed_forms(gmm64, temperature):
    """Eq. 9 (L_pos) and eq. 13 (L_neg) with h of eq. 16, in float64 (T = 1 is the paper; T scales them by 1/T)."""
    g = torch.Generator().manual_seed(1)
    u = (torch.randn(64, 3, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ld = gmm64.log_density(u)
    loss = MixtureLoss(alpha=0.3, temperature=temperature).calibrate(ld.median().item())
    p_in = loss.p_inside(ld).detach()
    assert 0.05 < p_in.mean() < 0.95  # both terms are live at these points
    (grad_pos,) = torch.autograd.grad(loss.positive(ld).sum(), u, retain_graph=True)
    (grad_neg,) = torch.autograd.grad(loss.negative(ld).sum(), u)
    h = _h(gmm64, u.detach())
    assert torch.allclose(grad_pos, -h * (1 - p_in)[:, None] / temperature, atol=1e-6)
    assert torch.allclose(grad_neg, h * p_in[:, None] / temperature, atol=1e-6)


def test_log_space_survives_densities_that_underflow():
    loss = MixtureLoss().calibrate(-300.0)
    ld = torch.tensor([-5000.0, -300.0, 400.0], dtype=torch.float64)
    assert torch.isfinite(loss.positive(ld)).all() and torch.isfinite(loss.negative(ld)).all()
    assert loss.p_inside(ld)[1].item() == pytest.approx(0.5)
    assert loss.positive(ld)[0].item() == pytest.approx(4700.0)


def test_calibration_quantile_and_midpoint():
    good = torch.arange(101, dtype=torch.float64)
    neg = -torch.arange(101, dtype=torch.float64) - 10
    assert boundary_log_density(good, None, "quantile", 0.1) == pytest.approx(10.0)
    assert boundary_log_density(good, neg, "midpoint") == pytest.approx(-5.0)
    with pytest.raises(AnomatuneError, match="negatives"):
        boundary_log_density(good, None, "midpoint")


@pytest.mark.parametrize("mode", ["fraction", "threshold", "none"])
def test_filtered_out_negatives_get_exactly_zero_gradient(gmm64, mode):
    g = torch.Generator().manual_seed(2)
    u = (torch.randn(50, 3, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ld = gmm64.log_density(u)
    loss = MixtureLoss().calibrate(ld.median().item())
    kept = keep_negatives(ld, loss, mode, fraction=0.2)
    (loss.negative(ld[kept]).sum() / len(kept)).backward()
    dropped = torch.ones(50, dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(u.grad[dropped], torch.zeros_like(u.grad[dropped]))
    assert (u.grad[kept].abs().sum(1) > 0).all()
    expected = {"fraction": 10, "threshold": int((loss.p_inside(ld) < 0.5).sum()), "none": 50}[mode]
    assert len(kept) == expected
    if mode == "fraction":  # the most-outside ones
        assert ld[kept].max() <= ld[dropped].min()


def test_padim_online_update_follows_each_position():
    g = torch.Generator().manual_seed(3)
    padim = PaDiM(ridge=0.01).fit(torch.randn(20, 2, 2, 2, generator=g))
    shift = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    for _ in range(300):
        batch = torch.randn(5, 4, 2, generator=g) + shift
        padim.online_update(batch.reshape(-1, 2), torch.arange(4).repeat(5), decay=0.95)
    assert torch.allclose(padim.means_.float(), shift, atol=0.3)  # means are float64 (exact updates)


# -- the loop on a tiny dataset (the fast random-weight backbone) -------------------------------------


def _tiny(**changes) -> FinetuneSettings:
    return tiny_settings(**({"lr": 1e-3, "validation_share": 0} | changes))


def test_finetune_writes_a_backbone_that_fit_and_evaluate_use(train, natural_dir, tmp_path):
    out = tmp_path / "ft"
    report = finetune(train, natural_dir, out, _tiny(), device="cpu")
    for name in (
        "backbone.safetensors",
        "finetune.yaml",
        "diagnostics.json",
        "finetune_weights.png",
        "finetune_loss.png",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]
    assert report["start"]["good_feature_norm"] > 0 and "collapsed" in report
    tuned = load_file(str(out / "backbone.safetensors"))
    start = create_backbone("test_efficientnet", weights="random").model.state_dict()
    assert set(tuned) == {k for k in start if not k.startswith("classifier")}
    assert not torch.equal(tuned["blocks.1.0.conv_exp.weight"], start["blocks.1.0.conv_exp.weight"])  # trained
    assert torch.equal(tuned["conv_head.weight"], start["conv_head.weight"])  # unused stage: as it started
    for detector in ("glad", "patchcore"):
        settings = {"name": "glad", "n_components": 2} if detector == "glad" else detector
        Pipeline(detector=settings, **(FAST | {"backbone_weights": str(out)}), device="cpu").fit(train).save(tmp_path / detector)
        assert Pipeline.load(tmp_path / detector).fit_record_.weights_id.startswith("sha256:")
        assert 0 <= evaluate(tmp_path / detector, figures=False, device="cpu")["image_auroc"] <= 1
    page = build_report(tmp_path / "glad").read_text()
    assert "4 steps guided by gmm" in page and page.count("data:image/png;base64,") >= 2  # Figure 2 and the loss curves
    assert "No validation: the last step's weights are used" in page


def test_online_update_comes_before_the_loss(train, natural_dir, tmp_path, monkeypatch):
    calls = []
    original_update, original_density = GMM.online_update, GMM.log_density
    monkeypatch.setattr(GMM, "online_update", lambda self, *a, **k: (calls.append("update"), original_update(self, *a, **k))[1])
    tuner = Finetuner(train, natural_dir, tmp_path / "ft", _tiny(), device="cpu")
    tuner.setup()
    monkeypatch.setattr(GMM, "log_density", lambda self, *a, **k: (calls.append("density"), original_density(self, *a, **k))[1])
    means = tuner.guide.means_.clone()
    tuner.step(tuner.optimizer())
    assert calls == ["update", "density", "density"]
    assert not torch.equal(tuner.guide.means_, means)


def test_resume_after_a_kill_gives_the_uninterrupted_result(train, natural_dir, tmp_path, monkeypatch, caplog):
    finetune(train, natural_dir, tmp_path / "whole", _tiny(), device="cpu")
    finetune_killed_at_step_3(monkeypatch, train, natural_dir, tmp_path / "resumed", _tiny(), device="cpu")
    with pytest.raises(RunFolderError, match="--resume"):
        finetune(train, natural_dir, tmp_path / "resumed", _tiny(), device="cpu")
    with pytest.raises(AnomatuneError, match="other settings .*lr"):
        finetune(train, natural_dir, tmp_path / "resumed", _tiny(lr=1e-2), device="cpu", resume=True)
    finetune(train, natural_dir, tmp_path / "resumed", _tiny(), device="cpu", resume=True)
    whole = load_file(str(tmp_path / "whole" / "backbone.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "backbone.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with caplog.at_level("WARNING"):  # --resume without a checkpoint starts over, and says so
        finetune(train, natural_dir, tmp_path / "fresh", _tiny(steps=1), device="cpu", resume=True)
    assert any("holds no checkpoint, so the fine-tuning starts from step 0" in r.message for r in caplog.records)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(train, natural_dir, tmp_path, monkeypatch):
    original = MixtureLoss.positive
    calls = {"n": 0}

    def nan_at_step_3(self, ld):
        calls["n"] += 1
        return original(self, ld) * (math.nan if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(MixtureLoss, "positive", nan_at_step_3)
    with pytest.raises(AnomatuneError, match=r"step 3.*checkpoint \(step 2\)"):
        finetune(train, natural_dir, tmp_path / "ft", _tiny(), device="cpu")
    assert torch.load(tmp_path / "ft" / FinetuneFolder.CHECKPOINT, weights_only=True)["step"] == 2


def test_frozen_blocks_stay_as_they_started_and_auto_temperature(train, natural_dir, tmp_path):
    report = finetune(train, natural_dir, tmp_path / "ft", _tiny(frozen_blocks=1, temperature=0, steps=2), device="cpu")
    tuned = load_file(str(tmp_path / "ft" / "backbone.safetensors"))
    start = create_backbone("test_efficientnet", weights="random").model.state_dict()
    assert torch.equal(tuned["conv_stem.weight"], start["conv_stem.weight"])
    assert torch.equal(tuned["blocks.0.0.conv.weight"], start["blocks.0.0.conv.weight"])
    assert not torch.equal(tuned["blocks.1.0.conv_exp.weight"], start["blocks.1.0.conv_exp.weight"])
    config = yaml.safe_load((tmp_path / "ft" / "finetune.yaml").read_text())
    assert config["temperature"] > 0 and config["temperature"] != 1.0 and report["history"]
    assert auto_temperature(torch.tensor([10.0, 12.0, 14.0]), torch.tensor([-30.0, -20.0, -10.0])) == pytest.approx(4.0)


def test_pasted_negatives_only_count_the_pasted_patches(train, natural_dir, tmp_path):
    from anomatune.data.datasets import NaturalImages
    from anomatune.finetune.negatives import NegativeSampler, patch_mask

    good = torch.rand(3, 3, 64, 64)
    settings = FinetuneSettings(negative_mode="pasted", paste_min=0.3, paste_max=0.5)
    images, masks, _ = NegativeSampler(NaturalImages(natural_dir, image_size=64), good, settings).sample(
        4, torch.Generator().manual_seed(0)
    )
    assert (
        images.shape == (4, 3, 64, 64)
        and 0.09 * 64 * 64 <= masks.sum((1, 2, 3)).min()
        and masks.sum((1, 2, 3)).max() <= 0.25 * 64 * 64 + 64
    )
    outside = masks.expand_as(images) == 0
    assert any(torch.equal(images[0][outside[0]], g[outside[0]]) for g in good)  # the rest is a good image, untouched
    assert patch_mask(masks, (8, 8)).shape == (4 * 64,) and 0 < patch_mask(masks, (8, 8)).sum() < 4 * 64
    report = finetune(train, natural_dir, tmp_path / "ft", _tiny(paste_min=0.4, paste_max=0.6, steps=2), device="cpu")
    assert len(report["history"]) == 2 and sum(report["start"]["negative_histogram"]) < 2 * 16


def test_dry_run_guides_and_refusals(train, natural_dir, tmp_path):
    summary = dry_run(train, natural_dir, tmp_path / "dry", _tiny(guide="padim"), device="cpu")
    assert 0 <= summary["negative_visible_share"] <= 1 and (tmp_path / "dry" / "dry_run_weights.png").is_file()
    tuner = Finetuner(train, natural_dir, tmp_path / "knn", _tiny(guide="patchcore", mode="adaptor"), device="cpu")
    summary = tuner.setup()  # PatchCore guides by its soft k-NN density, and follows the good features
    assert 0 <= summary["negative_visible_share"] <= 1
    bank = tuner.guide.memory_bank_.clone()
    record = tuner.step(tuner.optimizer())
    assert math.isfinite(record["loss"]) and not torch.equal(bank, tuner.guide.memory_bank_)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunFolderError, match="holds files anomatune did not write"):
        finetune(train, natural_dir, tmp_path / "mine", _tiny(), device="cpu")
    with pytest.raises(AnomatuneError, match="paste_min .* must not exceed paste_max"):
        _tiny(paste_min=0.5, paste_max=0.2)
