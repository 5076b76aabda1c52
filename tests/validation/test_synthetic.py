"""The synthetic anomaly families: where they change the image, how large they are, and that a seed repeats them."""

import math

import pytest
import torch

from anomatune.validation import synthetic
from anomatune.validation.settings import FAMILIES


def _images(n=6, size=64) -> torch.Tensor:
    """Smooth, varied images: gradients with a random colour each (the families need content to copy)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    colours = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    return (0.2 + 0.6 * colours * (0.5 + 0.5 * (xs + ys)[None, None] / 2)).clamp(0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_marks_a_region_and_keeps_values_in_range(family):
    images = _images()
    out, masks, severities = synthetic.synthesize(family, images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and masks.shape == (6, 1, 64, 64) and severities.shape == (6,)
    assert out.min() >= 0 and out.max() <= 1 and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.sum((1, 2, 3)) > 0).all() and (masks.mean((1, 2, 3)) < 0.5).all()
    assert ((out - images).abs().amax((1, 2, 3)) > 0).all()  # every image is changed
    again = synthetic.synthesize(family, images, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out) and torch.equal(again[1], masks)


@pytest.mark.parametrize("family", ["cutpaste", "scar", "texture", "color"])
def test_pasting_families_leave_everything_outside_the_mask_untouched(family):
    images = _images()
    out, masks, _ = synthetic.synthesize(family, images, torch.Generator().manual_seed(2))
    outside = masks.expand_as(images) == 0
    if family == "color":  # its edge is feathered by a 5-px box: untouched beyond it
        outside = torch.nn.functional.max_pool2d(masks, 5, 1, 2).expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])


def test_severities_spread_evenly_and_larger_ones_cover_more():
    images = _images(n=10)
    _, masks, severities = synthetic.synthesize("cutpaste", images, torch.Generator().manual_seed(0))
    assert sorted((severities * 10).floor().long().tolist()) == list(range(10))  # one per tenth: subtle to obvious
    area = masks.mean((1, 2, 3))
    order = severities.argsort()
    assert area[order[-3:]].mean() > 3 * area[order[:3]].mean()
    low, high = synthetic.AREA["cutpaste"]
    assert synthetic.between((low, high), 0.5, log_scale=True) == pytest.approx(math.sqrt(low * high))


def test_poisson_blend_keeps_the_target_when_the_source_only_differs_by_a_constant():
    """h is harmonic with boundary values -c: the constant -c, so the blend gives back the target inside the mask."""
    target = _images(1)[0]
    mask = torch.zeros(64, 64)
    mask[20:40, 10:30] = 1
    blended = synthetic.poisson_blend(target, target - 0.1, mask, steps=500)
    assert torch.allclose(blended, target, atol=1e-4)
    other = torch.zeros(3, 64, 64)
    seamless = synthetic.poisson_blend(target, other, mask)
    assert torch.equal(seamless[:, mask == 0], target[:, mask == 0])


def test_texture_uses_the_photos_given():
    images = _images(2)
    photos = torch.zeros(1, 3, 64, 64)  # black photos: the texture darkens the region
    out, masks, _ = synthetic.synthesize("texture", images, torch.Generator().manual_seed(0), photos)
    inside = masks.expand_as(images) == 1
    assert (out[inside] <= images[inside] + 1e-6).all()


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown anomaly family 'dent'"):
        synthetic.synthesize("dent", _images(2), torch.Generator())
