"""The fine-tuning tests' data: the tiny MVTec category and a folder of three "photos"."""

import numpy as np
import pytest

from anomatune import open_dataset
from anomatune.finetune import Finetuner, finetune

from ..conftest import save_image


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
