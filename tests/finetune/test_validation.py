"""Validation without test labels, early stopping, the fallback, the adaptor mode and the new negatives."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from anomatune import Pipeline, build_report, evaluate
from anomatune.errors import AnomatuneError, BackboneError, SettingsError
from anomatune.features.backbones import create_backbone
from anomatune.features.extractor import FeatureExtractor
from anomatune.features.settings import FeatureSettings
from anomatune.finetune import Finetuner, FinetuneSettings, finetune, loop, validation
from anomatune.finetune.negatives import NegativeSampler
from anomatune.finetune.validation import ValidationSet, holdout, noise_defects, validation_score
from anomatune.folders.kinds import FinetuneFolder

from ..conftest import FAST
from .conftest import finetune_killed_at_step_3, tiny_settings


def _tiny(**changes) -> FinetuneSettings:
    return tiny_settings(**({"lr": 1e-2, "validation_fit_images": 4} | changes))


def test_holdout_is_seeded_disjoint_and_keeps_two_of_each():
    kept, held = holdout(20, 0.2, seed=3)
    assert (
        len(held) == 4
        and set(kept.tolist()) | set(held.tolist()) == set(range(20))
        and not set(kept.tolist()) & set(held.tolist())
    )
    assert torch.equal(holdout(20, 0.2, seed=3)[1], held) and not torch.equal(holdout(20, 0.2, seed=4)[1], held)
    assert len(holdout(5, 0.01, 0)[1]) == 2 and len(holdout(5, 0.9, 0)[0]) == 2 and len(holdout(5, 0.0, 0)[1]) == 0


def test_noise_defects_change_only_their_mask():
    images = torch.full((3, 3, 64, 64), 0.5)
    defective, masks = noise_defects(images, torch.Generator().manual_seed(0))
    area = masks.mean((1, 2, 3))
    assert ((area >= validation.NOISE_AREA[0] * 0.9) & (area <= validation.NOISE_AREA[1] * 1.1)).all()
    outside = masks.expand_as(images) == 0
    assert torch.equal(defective[outside], images[outside]) and (defective[~outside] != 0.5).any()


def test_validation_set_holds_each_image_good_and_with_each_defect(natural_dir):
    from anomatune.data.datasets import NaturalImages

    held = torch.rand(3, 3, 32, 32)
    both = ValidationSet.build(held, NaturalImages(natural_dir, image_size=32), FinetuneSettings(), seed=0)
    assert both.kinds == ["good"] * 3 + ["natural"] * 3 + ["noise"] * 3 and both.labels.tolist() == [0] * 3 + [1] * 6
    assert torch.equal(both.images[:3], held) and both.masks[:3].sum() == 0 and (both.masks[3:].sum((1, 2, 3)) > 0).all()
    noise_only = ValidationSet.build(held, None, FinetuneSettings(), seed=0)
    assert noise_only.kinds == ["good"] * 3 + ["noise"] * 3


def test_validation_score_ranks_separable_features_perfectly():
    good = torch.randn(12, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    masks = torch.zeros(8, 1, 64, 64)
    masks[4:, :, :32, :32] = 1  # the defect covers the top-left quarter of images 4..7
    valset = ValidationSet(torch.zeros(8, 3, 64, 64), torch.tensor([0] * 4 + [1] * 4), masks, ["good"] * 4 + ["noise"] * 4)
    features = good[:8].clone()
    features[4:, :, :2, :2] += 10.0
    result = validation_score("padim", good, features, valset, seed=0)
    assert result["image_auroc"] == 1.0 and result["pixel_auroc"] > 0.95
    assert result["score"] == pytest.approx((result["image_auroc"] + result["pixel_auroc"]) / 2)


def test_the_best_checkpoint_is_kept_and_a_run_that_never_beats_the_frozen_one_falls_back(
    train, natural_dir, mvtec_tree, tmp_path, monkeypatch, caplog
):
    scores = iter([0.9, 0.95, 0.93])  # steps 0, 2, 4: step 2 is the best
    monkeypatch.setattr(loop, "validation_score", lambda *a, **k: {"image_auroc": 1.0, "pixel_auroc": 1.0, "score": next(scores)})
    report = finetune(train, natural_dir, tmp_path / "best", _tiny(), device="cpu")
    assert [v["step"] for v in report["validation"]] == [0, 2, 4] and report["kept_step"] == 2 and not report["fallback"]
    kept, last = (load_file(str(tmp_path / "best" / name)) for name in (FinetuneFolder.BACKBONE, FinetuneFolder.LAST_BACKBONE))
    assert not torch.equal(kept["blocks.1.0.conv_exp.weight"], last["blocks.1.0.conv_exp.weight"])

    scores = iter([0.9, 0.89, 0.85])
    monkeypatch.setattr(loop, "validation_score", lambda *a, **k: {"image_auroc": 1.0, "pixel_auroc": 1.0, "score": next(scores)})
    report = finetune(train, natural_dir, tmp_path / "fallback", _tiny(), device="cpu")
    assert report["fallback"] and report["kept_step"] == 0
    record = yaml.safe_load((tmp_path / "fallback" / FinetuneFolder.RECORD).read_text())
    assert record["fallback"] and record["validation"]["kept"]["step"] == 0
    frozen = create_backbone("test_efficientnet", weights="random").model.state_dict()
    kept = load_file(str(tmp_path / "fallback" / FinetuneFolder.BACKBONE))
    assert all(torch.equal(kept[k], frozen[k]) for k in kept)  # the frozen backbone, exactly
    with caplog.at_level("WARNING"):
        pipeline = Pipeline(detector="padim", **(FAST | {"backbone_weights": str(tmp_path / "fallback")}), device="cpu").fit(
            train
        )
    assert any("did not beat the frozen backbone" in r.message for r in caplog.records)
    test_images = sorted((mvtec_tree / "widget" / "test").rglob("*.png"))
    evaluate(pipeline.save(tmp_path / "run").path, figures=False, device="cpu")
    assert "Fallback: no checkpoint beat the frozen backbone" in build_report(tmp_path / "run").read_text()
    frozen_scores = Pipeline(detector="padim", **FAST, device="cpu").fit(train).predict(test_images).scores
    assert torch.allclose(torch.as_tensor(pipeline.predict(test_images).scores), torch.as_tensor(frozen_scores))


def test_adaptor_mode_trains_only_an_identity_initialised_adaptor_that_fit_then_applies(train, natural_dir, tmp_path):
    settings = _tiny(mode="adaptor", adaptor_width=4, validation_share=0, trust=0.5)
    tuner = Finetuner(train, natural_dir, tmp_path / "ft", settings, device="cpu")
    images = torch.rand(2, 3, 32, 32)
    plain = FeatureExtractor(FeatureSettings(backbone="test_efficientnet", backbone_weights="random")).eval()
    assert torch.equal(tuner.extractor.eval().raw_features(images), plain.raw_features(images))  # starts as the identity
    report = tuner.run()
    assert all(h["drift"] >= 0 for h in report["history"]) and report["history"][-1]["drift"] > 0
    tuned = load_file(str(tmp_path / "ft" / FinetuneFolder.BACKBONE))
    frozen = create_backbone("test_efficientnet", weights="random").model.state_dict()
    assert {k for k in tuned if k.startswith("adaptor.")} == {"adaptor.down", "adaptor.bias", "adaptor.up"}
    assert all(torch.equal(tuned[k], frozen[k]) for k in tuned if not k.startswith("adaptor."))  # the backbone did not move
    assert tuned["adaptor.up"].abs().sum() > 0
    adapted = FeatureExtractor(
        FeatureSettings(backbone="test_efficientnet", backbone_weights=str(tmp_path / "ft" / FinetuneFolder.BACKBONE))
    ).eval()
    assert not torch.allclose(adapted.raw_features(images), plain.raw_features(images))
    with pytest.raises(BackboneError, match="adaptor was trained on .*use the fine-tuning's layers"):
        FeatureExtractor(
            FeatureSettings(
                backbone="test_efficientnet", backbone_weights=str(tmp_path / "ft" / FinetuneFolder.BACKBONE), layers=(2,)
            )
        )
    with pytest.raises(AnomatuneError, match="already holds an adaptor"):
        Finetuner(train, natural_dir, tmp_path / "again", settings.updated(backbone_weights=str(tmp_path / "ft")), device="cpu")


def test_adaptor_mode_resumes_exactly(train, natural_dir, tmp_path, monkeypatch):
    settings = _tiny(mode="adaptor", adaptor_width=4, negative_mode="cutpaste+noise")
    finetune(train, natural_dir, tmp_path / "whole", settings, device="cpu")
    finetune_killed_at_step_3(monkeypatch, train, natural_dir, tmp_path / "resumed", settings, device="cpu")
    finetune(train, natural_dir, tmp_path / "resumed", settings, device="cpu", resume=True)
    for name in (FinetuneFolder.BACKBONE, FinetuneFolder.LAST_BACKBONE):
        whole, resumed = (load_file(str(tmp_path / run / name)) for run in ("whole", "resumed"))
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_cutpaste_negatives_come_from_the_product_and_need_no_photos(train, tmp_path):
    good = torch.rand(4, 3, 64, 64)
    images, masks = NegativeSampler(None, good, FinetuneSettings(negative_mode="cutpaste")).sample(
        3, torch.Generator().manual_seed(0)
    )
    outside = masks.expand_as(images) == 0
    assert (masks.sum((1, 2, 3)) > 0).all()
    assert all(any(torch.equal(images[i][outside[i]], g[outside[i]]) for g in good) for i in range(3))
    report = finetune(train, None, tmp_path / "ft", _tiny(negative_mode="cutpaste+noise", batch_neg=2, steps=2), device="cpu")
    assert len(report["history"]) == 2
    with pytest.raises(AnomatuneError, match="needs a folder of natural photos: pass --negatives DIR"):
        Finetuner(train, None, tmp_path / "x", _tiny(negative_mode="pasted"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"negative_mode": "pasted+glitter"}, "use one or more of photos, pasted, cutpaste, noise"),
        ({"negative_mode": "pasted+pasted"}, "use one or more of"),
        ({"negative_mode": "noise"}, "noise needs an image kind beside it"),
        ({"negative_mode": "pasted+cutpaste+noise", "batch_neg": 2}, "at least the number of negative kinds"),
        ({"mode": "adaptor", "frozen_blocks": 2}, "frozen_blocks applies to mode=backbone"),
        ({"validation_share": 0.95}, "validation_share"),
    ],
)
def test_bad_finetune_settings_get_one_line(changes, message):
    with pytest.raises(SettingsError, match=message):
        FinetuneSettings().updated(**changes)
