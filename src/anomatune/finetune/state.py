"""The fine-tuning's training state: everything a checkpoint must hold besides the modules' weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainingState:
    """Where a fine-tuning stands: steps done, its one seeded generator, what it has recorded so far.

    Every draw of the training goes through ``generator``; saving its state with the rest
    is what makes ``--resume`` reproduce an uninterrupted run.
    """

    generator: torch.Generator
    step: int = 0
    history: list[dict] = field(default_factory=list)  # a record per step: loss terms, gradient weights
    validation: list[dict] = field(default_factory=list)  # a record per checkpoint; the first is the frozen features'
    best: dict | None = None  # {"step", "score", "state"}: the best checkpoint on validation so far
    start: dict | None = None  # the diagnostics of the frozen features
    noise_basis: torch.Tensor | None = None  # the guide space's low-variance directions, scaled (noise negatives)

    @classmethod
    def fresh(cls, seed: int) -> TrainingState:
        return cls(torch.Generator().manual_seed(seed))

    def to_dict(self) -> dict:
        """Plain tensors and containers (a checkpoint is read back with ``weights_only=True``)."""
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "history": self.history,
            "validation": self.validation,
            "best": self.best,
            "start": self.start,
            "noise_basis": self.noise_basis,
        }

    @classmethod
    def from_dict(cls, saved: dict) -> TrainingState:
        generator = torch.Generator()
        generator.set_state(saved["generator"])
        return cls(
            generator, saved["step"], saved["history"], saved["validation"], saved["best"], saved["start"], saved["noise_basis"]
        )

    def remember(self, result: dict, state: dict[str, torch.Tensor], min_gain: float) -> None:
        """Record a validation ``result`` of the weights ``state``; keep them when they are the best so far and beat the
        frozen features (the first result) by more than ``min_gain``."""
        self.validation.append(result)
        frozen_score = self.validation[0]["score"]
        if self.best is None or (result["score"] > self.best["score"] and result["score"] > frozen_score + min_gain):
            self.best = {
                "step": result["step"],
                "score": result["score"],
                "state": {k: v.detach().cpu().clone() for k, v in state.items()},
            }

    @property
    def kept_step(self) -> int:
        """The step whose weights the fine-tuning keeps: the best on validation, else the last."""
        return self.step if self.best is None else self.best["step"]

    @property
    def fallback(self) -> bool:
        """No checkpoint beat the frozen features on validation."""
        return self.best is not None and self.kept_step == 0
