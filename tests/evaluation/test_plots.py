"""The heatmap overlay: matplotlib's jet colours, drawn in integers, at a cost bounded by the image's own size."""

import tracemalloc

import numpy as np
from matplotlib import colormaps

from anomatune.evaluation.plots import heat_overlay


def _case(height=300, width=200):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), rng.random((height, width), dtype=np.float32) * 2 - 0.5


def test_overlay_is_matplotlibs_jet_blended_within_one_level():
    image, heat = _case()
    scaled = np.clip((heat - 0.1) / 0.7, 0, 1)
    expected = 0.55 * image + 0.45 * colormaps["jet"](scaled)[..., :3] * 255
    drawn = heat_overlay(image, heat, 0.1, 0.8)
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape
    assert np.abs(drawn.astype(float) - expected).max() <= 2  # 1/256ths of alpha and integer rounding


def test_overlay_memory_is_a_small_multiple_of_the_image():
    image, heat = _case(3000, 2000)  # 18 MB of pixels; a float64 colour map would take 190 MB
    tracemalloc.start()
    heat_overlay(image, heat, 0.0, 1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * image.nbytes, peak  # the overlay itself and a band of rows (a few MB)
