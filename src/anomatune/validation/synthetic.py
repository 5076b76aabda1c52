"""Synthetic anomalies of several families, from obvious to subtle, with their masks.

Each family takes good images ``(N, 3, H, W)`` in [0, 1], a seeded generator and a
severity per image in [0, 1] (0 = subtle: small and faint; 1 = obvious: large and
strong), and returns the defective images and their masks ``(N, 1, H, W)``:

- ``cutpaste``: a rectangle of the image itself, colour-jittered, pasted elsewhere (CutPaste);
- ``scar``: a thin, rotated stripe of the image itself pasted elsewhere (CutPaste-scar);
- ``texture``: a smooth-noise (Perlin-like) region filled with a foreign texture at some
  opacity (DRAEM): a photo crop when a photo source is given, a procedural texture otherwise;
- ``blend``: a patch of *another* good image, Poisson-blended (its gradients, the
  target's border; NSA);
- ``deform``: a local smooth warp of the image's own content;
- ``color``: a smooth-noise blob whose colours and brightness shift.

Sizes are log-uniform between each family's bounds and contrasts linear, both along the
severity, so that a validation set spreads from easy to hard and does not saturate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .settings import FAMILIES

AREA = {  # share of the image a defect covers, (subtle, obvious)
    "cutpaste": (0.002, 0.03),
    "scar": (0.0008, 0.006),
    "texture": (0.002, 0.03),
    "blend": (0.003, 0.04),
    "deform": (0.01, 0.08),
    "color": (0.002, 0.03),
}
POISSON_STEPS = 300  # Jacobi iterations of the blend's Laplace solve: converged for patches up to ~60 px


def between(bounds: tuple[float, float], severity: float, log_scale: bool = False) -> float:
    low, high = bounds
    if log_scale:
        return math.exp(math.log(low) + (math.log(high) - math.log(low)) * severity)
    return low + (high - low) * severity


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def smooth_noise(shape: tuple[int, ...], size: tuple[int, int], cells: int, generator: torch.Generator) -> torch.Tensor:
    """Random values on a coarse ``cells``-per-side grid, upsampled bicubically: a smooth field in about [-1, 1]."""
    coarse = torch.rand(*shape, cells + 1, cells + 1, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)


def blob(size: tuple[int, int], area: float, generator: torch.Generator) -> torch.Tensor:
    """A Perlin-like region covering about ``area`` of the image, around one random centre: ``(H, W)`` in {0, 1}."""
    h, w = size
    cells = int(2 ** torch.randint(2, 5, (), generator=generator))
    field = smooth_noise((1, 1), size, cells, generator)[0, 0]
    cy, cx = uniform(generator, 0.15, 0.85) * h, uniform(generator, 0.15, 0.85) * w
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    radius = math.sqrt(area * h * w / math.pi)
    distance = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt() / (2 * radius)
    score = field - distance  # noise shaped region near the centre
    return (score >= torch.quantile(score.flatten(), 1 - area)).float()


def rectangle(size: tuple[int, int], area: float, aspect: float, angle: float, generator: torch.Generator) -> torch.Tensor:
    """A rotated rectangle of ``area`` (share of the image) and ``aspect`` (long / short side): ``(H, W)`` in {0, 1}."""
    h, w = size
    short = math.sqrt(area * h * w / aspect)
    long = short * aspect
    cy, cx = uniform(generator, 0.1, 0.9) * h, uniform(generator, 0.1, 0.9) * w
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) - cy, torch.arange(w, dtype=torch.float32) - cx, indexing="ij")
    along, across = xs * math.cos(angle) + ys * math.sin(angle), -xs * math.sin(angle) + ys * math.cos(angle)
    return ((along.abs() <= long / 2) & (across.abs() <= max(short, 1.0) / 2)).float()


def jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and per-channel colour changes of up to ``strength``."""
    gain = 1 + strength * (torch.rand(3, 1, 1, generator=generator) * 2 - 1)
    shift = strength * (torch.rand((), generator=generator) * 2 - 1)
    return ((image - image.mean()) * gain + image.mean() + shift).clamp(0, 1)


def shifted(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The image moved by a random offset of at least a sixth of each side: content from elsewhere in it."""
    h, w = image.shape[-2:]
    dy = int(torch.randint(h // 6, max(h // 6 + 1, h - h // 6), (), generator=generator))
    dx = int(torch.randint(w // 6, max(w // 6 + 1, w - w // 6), (), generator=generator))
    return torch.roll(image, (dy, dx), dims=(-2, -1))


def _cutpaste(image, severity, generator, **_):
    area = between(AREA["cutpaste"], severity, log_scale=True)
    mask = rectangle(image.shape[-2:], area, uniform(generator, 1, 3), uniform(generator, 0, math.pi), generator)
    patch = jitter(shifted(image, generator), 0.05 + 0.25 * severity, generator)
    return image * (1 - mask) + patch * mask, mask


def _scar(image, severity, generator, **_):
    area = between(AREA["scar"], severity, log_scale=True)
    mask = rectangle(image.shape[-2:], area, uniform(generator, 6, 14), uniform(generator, 0, math.pi), generator)
    patch = jitter(shifted(image, generator), 0.1 + 0.3 * severity, generator)
    return image * (1 - mask) + patch * mask, mask


def procedural_texture(size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A random-coloured smooth-noise texture at a random frequency: DRAEM's textures without a photo source."""
    cells = int(2 ** torch.randint(3, 7, (), generator=generator))
    field = smooth_noise((1, 3), size, cells, generator)[0]
    base = torch.rand(3, 1, 1, generator=generator)
    return (base + 0.5 * field).clamp(0, 1)


def _texture(image, severity, generator, photo=None, **_):
    area = between(AREA["texture"], severity, log_scale=True)
    mask = blob(image.shape[-2:], area, generator)
    texture = procedural_texture(image.shape[-2:], generator) if photo is None else photo
    opacity = 0.1 + 0.7 * severity  # DRAEM blends with an opacity drawn in [0.1, 1]
    return image * (1 - opacity * mask) + texture * opacity * mask, mask


def poisson_blend(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, steps: int = POISSON_STEPS) -> torch.Tensor:
    """Seamless cloning inside ``mask``: the source's gradients, the target's values on the border.

    The result is ``source + h`` where ``h`` is harmonic inside the mask and equals
    ``target − source`` outside; ``h`` is found by Jacobi iterations on the mask's bounding box.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return target
    y0, y1 = max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, mask.shape[0])
    x0, x1 = max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, mask.shape[1])
    inside = mask[y0:y1, x0:x1].bool()
    difference = (target - source)[:, y0:y1, x0:x1]
    h = torch.where(inside, difference[:, ~inside].mean(1, keepdim=True)[..., None] if (~inside).any() else 0.0, difference)
    for _ in range(steps):
        padded = F.pad(h[None], (1, 1, 1, 1), mode="replicate")[0]
        average = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]) / 4
        h = torch.where(inside, average, difference)
    out = target.clone()
    region = (source[:, y0:y1, x0:x1] + h).clamp(0, 1)
    out[:, y0:y1, x0:x1] = torch.where(inside, region, target[:, y0:y1, x0:x1])
    return out


def _blend(image, severity, generator, other=None, **_):
    area = between(AREA["blend"], severity, log_scale=True)
    mask = rectangle(image.shape[-2:], area, uniform(generator, 1, 2.5), uniform(generator, 0, math.pi), generator)
    source = shifted(image if other is None else other, generator)
    source = jitter(source, 0.1 * severity, generator)
    blended = poisson_blend(image, source, mask)
    return blended, mask


def _deform(image, severity, generator, **_):
    h, w = image.shape[-2:]
    area = between(AREA["deform"], severity, log_scale=True)
    region = blob((h, w), area, generator)
    soft = F.avg_pool2d(region[None, None], 9, stride=1, padding=4, count_include_pad=False)[0, 0]
    amplitude = (2.0 + 14.0 * severity) * 2 / max(h, w)  # largest displacement: 2 to 16 px, in grid units
    flow = smooth_noise((1, 2), (h, w), 4, generator)[0].permute(1, 2, 0) * amplitude * soft[..., None]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1) + flow
    warped = F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0]
    moved = flow.norm(dim=-1) * max(h, w) / 2 > 0.5  # pixels displaced by more than half a pixel
    return warped, moved.float()


def _color(image, severity, generator, **_):
    area = between(AREA["color"], severity, log_scale=True)
    mask = blob(image.shape[-2:], area, generator)
    soft = F.avg_pool2d(mask[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    strength = 0.03 + 0.2 * severity
    change = strength * (smooth_noise((1, 3), image.shape[-2:], 8, generator)[0] + torch.randn(3, 1, 1, generator=generator))
    return (image + soft * change).clamp(0, 1), mask


MAKERS: dict[str, Callable] = {
    "cutpaste": _cutpaste,
    "scar": _scar,
    "texture": _texture,
    "blend": _blend,
    "deform": _deform,
    "color": _color,
}


def synthesize(
    family: str,
    images: torch.Tensor,
    generator: torch.Generator,
    photos: torch.Tensor | None = None,
    severities: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One anomaly of ``family`` in each image, severities spread evenly from subtle to obvious (in a seeded order).

    ``photos``: ``(M, 3, H, W)`` textures for ``texture`` (procedural ones without); ``severities``:
    ``(N,)`` in [0, 1] to use instead (the fine-tuning's curriculum). Returns the images, masks
    ``(N, 1, H, W)`` and severities ``(N,)``.
    """
    if family not in MAKERS:
        raise ValueError(f"unknown anomaly family {family!r}: use one of {', '.join(FAMILIES)}")
    n = len(images)
    if severities is None:
        severities = ((torch.arange(n) + torch.rand(n, generator=generator)) / max(n, 1))[torch.randperm(n, generator=generator)]
    out, masks = images.clone(), torch.zeros(n, 1, *images.shape[-2:])
    for i in range(n):
        extra = {}
        if family == "blend" and n > 1:
            extra["other"] = images[(i + 1 + int(torch.randint(n - 1, (), generator=generator))) % n]
        if family == "texture" and photos is not None and len(photos):
            extra["photo"] = photos[int(torch.randint(len(photos), (), generator=generator))]
        out[i], masks[i, 0] = MAKERS[family](images[i], float(severities[i]), generator, **extra)
    return out, masks, severities
