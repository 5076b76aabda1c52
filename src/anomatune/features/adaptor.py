"""A small map on the patch features, trained instead of the backbone (``finetune --mode adaptor``).

Feature-adaptation methods (CFA, SimpleNet) keep the pretrained network frozen and learn
a light map on its patch features. Ours is a residual MLP ``u + U gelu(D u + b)`` with
``width`` hidden units, applied after the stages are concatenated and pooled: ``U``
starts at zero, so a fresh adaptor is the identity and the fine-tuning starts exactly
from the frozen features. It is non-linear on purpose: a Gaussian detector refit on
linearly mapped features (PaDiM, a full-covariance GMM) gives the same Mahalanobis
scores, so a linear adaptor could not change what the density detectors see (measured:
±0.001 image AUROC). The adaptor travels inside the fine-tuned weights file, under the
``adaptor.`` prefix, and every extractor built from that file applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError

PREFIX = "adaptor."


class Adaptor(nn.Module):
    """``u + up @ gelu(down @ u + bias)`` at every patch; ``(B, D, h, w)`` → ``(B, D, h, w)``."""

    def __init__(self, dim: int, width: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(width, dim, generator=generator) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(width))
        self.up = nn.Parameter(torch.zeros(dim, width))

    @property
    def dim(self) -> int:
        return self.down.shape[1]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(torch.einsum("rc,bchw->brhw", self.down.to(u.dtype), u) + self.bias.to(u.dtype).view(1, -1, 1, 1))
        return u + torch.einsum("dr,brhw->bdhw", self.up.to(u.dtype), hidden)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], origin: str) -> Adaptor:
        """The adaptor saved in a weights file (its tensors without the prefix)."""
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        width, dim = shapes.get("down", (0, 0))
        if shapes != {"down": (width, dim), "bias": (width,), "up": (dim, width)}:
            raise BackboneError(f"{origin}: the adaptor tensors do not fit together ({shapes}); fine-tune again")
        adaptor = cls(dim, width)
        adaptor.load_state_dict(state)
        return adaptor


def split_adaptor(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A weights file's backbone tensors, and its adaptor's (None when it has none)."""
    adaptor = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}, adaptor or None
