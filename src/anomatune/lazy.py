"""Lazy package exports (PEP 562): ``import anomatune.models.settings`` must not import torch.

A package lists ``{name: submodule}``; the submodule is imported the first time the
name is read, so the settings (and ``anomatune --help``) stay light.
"""

from __future__ import annotations

from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` on first use of ``name``."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
