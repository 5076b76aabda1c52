"""Every setting of the fine-tuning, with its default and why (torch-free, so ``--help`` is fast).

The CLI builds one ``anomatune finetune`` option per field from this dataclass; the
saved ``finetune.yaml`` is ``asdict(settings)``. Defaults marked "measured" come from
``benchmarks/results/finetune.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneSettings:
    # the density model that guides the fine-tuning, and the space it lives in
    model: str = _setting("gmm", "Guiding density model: gmm, glad or padim.")
    backbone: str = _setting("efficientnet_lite0", "Backbone to fine-tune (registered or timm name).")
    layers: str | None = _setting(None, "Comma-separated feature stages; default: the backbone's.")
    image_size: int = _setting(256, "Square input size in pixels.")
    pool: int = _setting(3, "Average-pooling neighbourhood of patch features.")
    proj_dim: int | None = _setting(32, "Dimension of the fixed projection the guiding model lives in (0 = none; measured).")
    proj: str = _setting("pca", "Projection kind: pca (fitted once on the frozen good features) or random.")
    n_components: int = _setting(16, "Components of the guiding GMM/GLAD.")
    ridge: float = _setting(0.1, "Covariance ridge of the guiding model (relative for GMM/GLAD, absolute for PaDiM).")
    # the mixture loss (supplementary §2)
    alpha: float = _setting(0.5, "Prior α of the negative (uniform) class.")
    calibration: str = _setting("midpoint", "Where P(z=+|u) = 1/2: 'quantile' of the good log-densities (the paper) or 'midpoint' of the good and negative medians (ours; measured).")
    boundary_quantile: float = _setting(0.01, "Quantile of the good patches' log-density that sets log L (calibration=quantile).")
    temperature: float = _setting(0.0, "Divides the log-density ratio in the posterior (ours; 1 = the paper) so negatives get gradient; 0 = auto: the gap between the good and negative median log-densities / 8 (measured).")
    decay: float = _setting(0.99, "Online-GMM decay β of the sufficient statistics, per step.")
    filter: str = _setting("threshold", "Outlier filter on negatives: fraction (the paper's default: the lowest log-density share), threshold (P(z=+|u)<1/2; measured) or none.")
    filter_fraction: float = _setting(0.1, "Share of each batch's negative patches kept by filter=fraction.")
    # negatives
    negative_mode: str = _setting("pasted", "Negatives: photos (whole colour-mapped natural images, the paper) or pasted (ours: pasted into good images; measured).")
    paste_min: float = _setting(0.1, "Smallest side of a pasted negative, as a share of the image side (negative_mode=pasted).")
    paste_max: float = _setting(0.35, "Largest side of a pasted negative, as a share of the image side (negative_mode=pasted).")
    rho_min: float = _setting(0.5, "Colour-transfer strength ρ ~ U[rho_min, 1] of the negatives.")
    crop_min: float = _setting(0.25, "Smallest area share of a negative's random-resized crop.")
    color_method: str = _setting("mk", "Colour transfer of the negatives: mk (Monge–Kantorovich) or diagonal.")
    # optimisation
    steps: int = _setting(200, "Optimisation steps.")
    lr: float = _setting(3e-5, "Adam learning rate.")
    batch_pos: int = _setting(4, "Good images per step.")
    batch_neg: int = _setting(4, "Negative images per step.")
    frozen_blocks: int = _setting(0, "Leading backbone blocks (and the stem) kept frozen; 0 trains every block the features use.")
    flip: str = _setting("none", "Flips of the good images: none, h, v or hv (only where the product allows them).")
    clip_grad: float | None = _setting(None, "Clip the gradient norm to this value (default: no clipping).")
    amp: bool = _setting(True, "bfloat16 mixed precision for the backbone on CUDA (ignored on the CPU).")
    checkpoint_every: int = _setting(50, "Write a checkpoint every this many steps (atomically).")
    diag_images: int = _setting(16, "Good and negative images in the start/end diagnostics.")
    seed: int = _setting(0, "Seed of every random draw (resumes reproduce the same run).")

    def layer_tuple(self) -> tuple[int, ...] | None:
        return tuple(int(v) for v in self.layers.split(",")) if self.layers else None


def setting_fields() -> list[tuple[str, type, object, str]]:
    """(name, type, default, help) of every setting, in order: what the CLI turns into options."""
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return [(f.name, types[f.type.split(" ")[0]], f.default, f.metadata["help"]) for f in fields(FinetuneSettings)]


CHOICES = {"model": ("gmm", "glad", "padim"), "proj": ("pca", "random"), "calibration": ("quantile", "midpoint"),
           "filter": ("fraction", "threshold", "none"), "color_method": ("mk", "diagonal"), "negative_mode": ("photos", "pasted"), "flip": ("none", "h", "v", "hv")}


def check_settings(settings: FinetuneSettings) -> list[str]:
    """Every problem with ``settings``, as messages that say what to pass instead."""
    problems = [f"{name} must be one of {', '.join(options)}, not {getattr(settings, name)!r}"
                for name, options in CHOICES.items() if getattr(settings, name) not in options]
    if not 0 < settings.alpha < 1:
        problems.append(f"alpha must be in (0, 1), not {settings.alpha}")
    if not 0 < settings.boundary_quantile < 1:
        problems.append(f"boundary_quantile must be in (0, 1), not {settings.boundary_quantile}")
    if settings.temperature < 0:
        problems.append(f"temperature must be positive (or 0 for auto), not {settings.temperature}")
    if not 0 <= settings.decay < 1:
        problems.append(f"decay must be in [0, 1), not {settings.decay}")
    if not 0 < settings.filter_fraction <= 1:
        problems.append(f"filter_fraction must be in (0, 1], not {settings.filter_fraction}")
    if not 0 < settings.paste_min <= settings.paste_max <= 1:
        problems.append(f"need 0 < paste_min <= paste_max <= 1, not {settings.paste_min}, {settings.paste_max}")
    if not 0 <= settings.rho_min <= 1 or not 0 < settings.crop_min <= 1:
        problems.append("rho_min must be in [0, 1] and crop_min in (0, 1]")
    if settings.frozen_blocks < 0:
        problems.append(f"frozen_blocks must be 0 or more, not {settings.frozen_blocks}")
    for name in ("steps", "batch_pos", "batch_neg", "checkpoint_every", "diag_images", "n_components"):
        if getattr(settings, name) < 1:
            problems.append(f"{name} must be at least 1, not {getattr(settings, name)}")
    return problems
