"""Devices: ``auto`` picks CUDA when present. Parsing is torch-free (settings); resolving imports torch."""

from __future__ import annotations

import re

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_device(value) -> str:
    """The device name if it is one anomatune knows (auto, cpu, cuda, cuda:N, mps); ``ValueError`` otherwise."""
    name = str(value).strip().lower()
    if not DEVICE.match(name):
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return name


def resolve_device(name):
    """A usable ``torch.device``; asking for CUDA where there is none is the user's error, said in one line."""
    import torch

    from .errors import AnomatuneError

    if isinstance(name, torch.device):
        return name
    name = parse_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnomatuneError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AnomatuneError(f"device {name!r} asked for, but MPS is not available here: use --device cpu or auto")
    return device
