"""Early stopping and the fallback on the label-free validation, the adaptor mode and the new negatives."""

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from anomatune import Pipeline, build_report, evaluate
from anomatune.errors import AnomatuneError, BackboneError, SettingsError
from anomatune.features.backbones import create_backbone
from anomatune.features.extractor import FeatureExtractor
from anomatune.features.settings import FeatureSettings
from anomatune.finetune import Finetuner, FinetuneSettings, finetune, loop
from anomatune.finetune.negatives import TOUCHED, NegativeSampler
from anomatune.folders.base import VALIDATION
from anomatune.folders.kinds import FinetuneFolder
from anomatune.validation.sets import ValidationSet
from anomatune.validation.settings import ValidationSettings

from ..conftest import FAST
from .conftest import finetune_killed_at_step_3, tiny_settings


def _tiny(**changes) -> FinetuneSettings:
    return tiny_settings(**({"lr": 1e-2, "validation_fit_images": 4} | changes))


def scored(score: float) -> dict:
    """What validation.scoring.score_detector returns, with this aggregate."""
    return {"score": score, "image_auroc": score, "aupro": 1.0, "families": {"cutpaste": {"image_auroc": score, "aupro": 1.0}}}


def test_the_best_checkpoint_is_kept_and_a_run_that_never_beats_the_frozen_one_falls_back(
    train, natural_dir, mvtec_tree, tmp_path, monkeypatch, caplog
):
    scores = iter([0.9, 0.95, 0.93])  # steps 0, 2, 4: step 2 is the best
    monkeypatch.setattr(loop, "score_detector", lambda *a, **k: scored(next(scores)))
    report = finetune(train, natural_dir, tmp_path / "best", _tiny(), device="cpu")
    assert [v["step"] for v in report["validation"]] == [0, 2, 4] and report["kept_step"] == 2 and not report["fallback"]
    kept, last = (load_file(str(tmp_path / "best" / name)) for name in (FinetuneFolder.BACKBONE, FinetuneFolder.LAST_BACKBONE))
    assert not torch.equal(kept["blocks.1.0.conv_exp.weight"], last["blocks.1.0.conv_exp.weight"])

    scores = iter([0.9, 0.89, 0.85])
    monkeypatch.setattr(loop, "score_detector", lambda *a, **k: scored(next(scores)))
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


def test_max_minutes_stops_early_and_validates_the_step_reached(train, natural_dir, tmp_path, monkeypatch, caplog):
    scores = iter([0.9, 0.95])  # step 0, then the step the time limit stops at
    monkeypatch.setattr(loop, "score_detector", lambda *a, **k: scored(next(scores)))
    with caplog.at_level("WARNING"):  # a millisecond's budget: after step 1 no further step fits
        report = finetune(train, natural_dir, tmp_path / "ft", _tiny(steps=6, max_minutes=1e-5), device="cpu")
    assert [v["step"] for v in report["validation"]] == [0, 1] and report["kept_step"] == 1
    assert len(report["history"]) == 1 and (tmp_path / "ft" / FinetuneFolder.BACKBONE).exists()
    assert any("stopped at step 1 of 6: max_minutes=1e-05" in r.message for r in caplog.records)


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


def test_the_validation_set_is_built_once_and_a_resume_reads_it(train, natural_dir, tmp_path, monkeypatch):
    settings = _tiny(mode="adaptor", adaptor_width=4, negative_mode="cutpaste+noise")
    finetune_killed_at_step_3(monkeypatch, train, natural_dir, tmp_path / "ft", settings, device="cpu")
    assert (tmp_path / "ft" / VALIDATION).is_file()

    def rebuilt(*args, **kwargs):
        raise AssertionError("the validation set was built again")

    monkeypatch.setattr(ValidationSet, "build", rebuilt)
    report = finetune(train, natural_dir, tmp_path / "ft", settings, device="cpu", resume=True)
    assert [v["step"] for v in report["validation"]] == [0, 2, 4]
    assert set(report["validation"][0]["families"]) == set(ValidationSettings().families)


def test_cutpaste_negatives_come_from_the_product_and_need_no_photos(train, tmp_path):
    good = torch.rand(4, 3, 64, 64)
    images, masks, _ = NegativeSampler(None, good, FinetuneSettings(negative_mode="cutpaste")).sample(
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
        ({"negative_mode": "pasted+glitter"}, "use one or more of photos, pasted, cutpaste, synthetic, noise"),
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


def test_near_negatives_follow_the_curriculum_from_obvious_to_subtle():
    settings = FinetuneSettings(negative_mode="synthetic", steps=100, curriculum=0.5)
    assert [settings.severity_floor(step) for step in (0, 25, 50, 99)] == [1.0, 0.5, 0.0, 0.0]
    assert settings.updated(curriculum=0.0).severity_floor(0) == 0.0
    good = torch.rand(4, 3, 64, 64)
    sampler = NegativeSampler(None, good, settings, families=("cutpaste", "color"))
    images, masks, severities = sampler.sample(6, torch.Generator().manual_seed(0), targets=good[[0, 1, 2, 3, 0, 1]], floor=0.8)
    assert ((severities >= 0.8) & (severities <= 1)).all() and ((masks == 1).sum((1, 2, 3)) > 0).all()
    untouched = masks.expand_as(images) == 0
    assert torch.equal(images[untouched], good[[0, 1, 2, 3, 0, 1]][untouched])  # the colour blob's fade is marked too
    assert (masks[1::2] == TOUCHED).any() and set(masks.unique().tolist()) <= {0.0, TOUCHED, 1.0}
    again = sampler.sample(6, torch.Generator().manual_seed(0), targets=good[[0, 1, 2, 3, 0, 1]], floor=0.8)
    assert torch.equal(again.images, images)  # seeded
    assert settings.updated(negative_families="scar, blend").negative_families == ("scar", "blend")
    with pytest.raises(SettingsError, match="expected distinct anomaly families"):
        settings.updated(negative_families="scar,glitter")


def test_the_negatives_may_use_other_families_than_the_validation(train, natural_dir, tmp_path):
    validation = ValidationSettings(families=("scar", "deform"))
    tuner = Finetuner(train, natural_dir, tmp_path / "ft", _tiny(negative_families="cutpaste,color"), validation)
    assert tuner.sampler.families == ("cutpaste", "color") and tuner.valset.families == ["scar", "deform"]
    assert Finetuner(train, natural_dir, tmp_path / "ft2", _tiny(), validation).sampler.families == ("scar", "deform")


def test_the_loss_sits_where_the_anomaly_is(train, natural_dir, tmp_path, monkeypatch):
    from anomatune.finetune.loss import MixtureLoss
    from anomatune.finetune.negatives import clean_mask, patch_mask

    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 0, 0] = 1.0  # one pixel of the first 4x4 patch: neither negative nor clean
    masks[0, 0, 4:, 4:] = 1.0  # the last patch, whole: negative
    assert patch_mask(masks, (2, 2)).tolist() == [False, False, False, True]
    assert clean_mask(masks, (2, 2)).tolist() == [False, True, True, False]
    counts, original = {}, MixtureLoss.positive
    for context in (True, False):  # how many patches the step's L_pos averages over
        tuner = Finetuner(train, natural_dir, tmp_path / f"ft{context}", _tiny(context_positives=context), device="cpu")
        tuner.setup()
        spy = lambda self, ld, context=context: counts.setdefault(context, len(ld)) and original(self, ld)  # noqa: E731
        monkeypatch.setattr(MixtureLoss, "positive", spy)
        tuner.step(tuner.optimizer())
    assert counts[True] > counts[False]  # the negatives' untouched patches join the good ones
    tiny = Finetuner(train, natural_dir, tmp_path / "subtle", _tiny(negative_mode="synthetic"), device="cpu")
    tiny.setup()  # on 40x30 px images no synthetic defect covers a whole patch: each one's most covered patch calibrates
    assert math.isfinite(tiny.loss.temperature) and math.isfinite(tiny.loss.log_volume)
