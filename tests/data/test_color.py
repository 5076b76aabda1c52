"""Colour transfer: moments at ρ = 1, grey targets, identity at ρ = 0, the figure command."""

import pytest
import torch

from anomatune.data.color import color_moments, transfer
from anomatune.errors import AnomatuneError


def _photo(seed: int, size: int = 24) -> torch.Tensor:
    """A colourful image with correlated channels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, size, size, generator=g)
    mix = torch.rand(3, 3, generator=g) + torch.eye(3)
    noise = 0.2 * torch.rand(1, 3, size, size, generator=g)
    return (torch.einsum("cd,bdhw->bchw", mix, torch.cat([base, base**2, noise[:, :1]], 1)) + noise) / 3


@pytest.mark.parametrize("method", ["mk", "diagonal"])
def test_rho_zero_is_the_identity(method):
    source, target = _photo(0), _photo(1)
    assert torch.allclose(transfer(source, target, 0.0, method), source, atol=1e-6)


def test_mk_at_rho_one_matches_the_target_moments():
    source, target = _photo(2), _photo(3, size=17)
    mu_t, cov_t = color_moments(target)
    mu, cov = color_moments(transfer(source, target, 1.0, "mk"))
    assert torch.allclose(mu, mu_t, atol=1e-3)
    assert torch.allclose(cov, cov_t, atol=1e-3)


def test_grey_target_gives_grey_output_through_mk_only():
    source = _photo(4)
    grey = _photo(5).mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    mk = transfer(source, grey, 1.0, "mk")
    assert (mk - mk.mean(1, keepdim=True)).abs().max() < 1e-3
    diagonal = transfer(source, grey, 1.0, "diagonal")
    assert (diagonal - diagonal.mean(1, keepdim=True)).abs().max() > 0.05


def test_batched_with_one_rho_per_image():
    source = torch.cat([_photo(6), _photo(7)])
    target = torch.cat([_photo(8), _photo(9)])
    out = transfer(source, target, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], source[0], atol=1e-6)
    assert torch.allclose(color_moments(out[1:])[0], color_moments(target[1:])[0], atol=1e-3)


def test_bad_inputs_are_named():
    with pytest.raises(AnomatuneError, match="method"):
        transfer(_photo(0), _photo(1), 1.0, "histogram")
    with pytest.raises(AnomatuneError, match="RGB"):
        transfer(torch.rand(1, 1, 4, 4), _photo(1))
