"""The fine-tuning tests' data: the tiny MVTec category and a folder of three "photos"."""

import numpy as np
import pytest

from anomatune import open_dataset
from anomatune.finetune import Finetuner, FinetuneSettings, finetune

from ..conftest import FAST, save_image

TINY_GUIDE = {"name": "gmm", "n_components": 2, "normalize": False}


def tiny_settings(**changes) -> FinetuneSettings:
    """A fine-tuning that runs in seconds on the tiny data: the fast backbone, 4 steps of 2 good and 2 negative images
    (pasted ones: on 40x30 px images a synthetic defect covers no whole feature patch, so L_neg would stay 0)."""
    base = dict(
        FAST,
        mode="backbone",
        negative_mode="pasted",
        proj_dim=8,
        steps=4,
        batch_pos=2,
        batch_neg=2,
        checkpoint_every=2,
        diag_images=2,
        guide=TINY_GUIDE,
        validator="padim",
    )
    return FinetuneSettings().updated(**(base | changes))


@pytest.fixture
def natural_dir(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        save_image(tmp_path / "natural" / f"photo{i}.png", size=(50, 40), rng=rng)
    return tmp_path / "natural"


@pytest.fixture
def train(mvtec_tree):
    return open_dataset(data=mvtec_tree, category="widget")


def finetune_killed_at_step_3(monkeypatch, *args, **kwargs) -> None:
    """Run ``finetune(*args, **kwargs)`` and kill it (KeyboardInterrupt) as step 3 begins."""
    original = Finetuner.step

    def killed_at_step_3(self, optimizer):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return original(self, optimizer)

    monkeypatch.setattr(Finetuner, "step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(*args, **kwargs)
    monkeypatch.setattr(Finetuner, "step", original)
