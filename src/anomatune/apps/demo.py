"""The embedded default: a small inspection dataset built from scikit-image's bundled images.

The "product" is scikit-image's brick texture: good images are random crops of it;
defective ones carry synthetic scratches, spots and colour stains, with their masks.
Everything comes from an installed package, so the demo needs no data and no network.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..finetune.settings import FinetuneSettings
from ..pipeline.settings import PipelineSettings
from .settings import DemoSettings

DEFECTS = ("scratch", "spot", "stain")
NEGATIVE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
)


def _texture() -> np.ndarray:
    from skimage import data

    return np.stack([data.brick()] * 3, axis=-1) if data.brick().ndim == 2 else data.brick()


def _crop(texture: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    h, w = texture.shape[:2]
    y, x = rng.integers(0, h - size), rng.integers(0, w - size)
    return Image.fromarray(texture[y : y + size, x : x + size])


def _add_defect(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Draw one defect and return the image and its 0/255 mask."""
    size = img.size[0]
    img = img.copy()
    mask = Image.new("L", img.size, 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    if kind == "scratch":
        x0, y0 = rng.integers(size // 8, size // 2, 2)
        x1, y1 = x0 + rng.integers(size // 4, size // 2), y0 + rng.integers(-size // 4, size // 4)
        width = int(rng.integers(2, 4))
        shade = int(rng.choice([20, 235]))
        draw.line([(x0, y0), (x1, y1)], fill=(shade,) * 3, width=width)
        mdraw.line([(x0, y0), (x1, y1)], fill=255, width=width)
    else:
        r = int(rng.integers(size // 16, size // 8))
        cx, cy = rng.integers(r, size - r, 2)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = (int(rng.integers(0, 60)),) * 3 if kind == "spot" else (200, 90, 40)
        draw.ellipse(box, fill=fill)
        mdraw.ellipse(box, fill=255)
    return img, mask


def build_dataset(
    root: str | Path, n_train: int = 60, n_good_test: int = 20, n_defect: int = 8, crop: int = 128, seed: int = 0
) -> Path:
    """Write the demo category ``root/brick`` in the MVTec AD layout and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    texture = _texture()
    category = root / "brick"
    for i in range(n_train):
        path = category / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _crop(texture, rng, crop).save(path)
    for i in range(n_good_test):
        path = category / "test" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _crop(texture, rng, crop).save(path)
    for kind in DEFECTS:
        for i in range(n_defect):
            img, mask = _add_defect(_crop(texture, rng, crop), kind, rng)
            for folder, picture, name in (
                (category / "test" / kind, img, f"{i:03d}.png"),
                (category / "ground_truth" / kind, mask, f"{i:03d}_mask.png"),
            ):
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / name)
    return root


def write_negatives(folder: str | Path) -> Path:
    """scikit-image's colour photos, the demo's negatives (natural images that are not bricks)."""
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in NEGATIVE_PHOTOS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}.png")
    return folder


def run_demo(
    out: str | Path = "runs/demo", pipeline: PipelineSettings | None = None, steps: int | None = None, **runtime
) -> dict:
    """Build the demo data, then fine-tune → fit frozen and fine-tuned → evaluate → report; print both side by side.

    ``pipeline``: the detector and features (default: the package defaults); ``steps``:
    fine-tuning steps (default: the demo's); ``runtime``: ``device``. The demo owns ``out``:
    its earlier fine-tuning is replaced; its models get a new version (the same one when nothing changed).
    """
    from ..data.layouts import open_dataset
    from ..evaluation.evaluate import evaluate
    from ..finetune.loop import finetune
    from ..folders.kinds import FinetuneFolder
    from ..inference.report import build_report
    from ..pipeline.pipeline import Pipeline

    out = Path(out)
    pipeline = pipeline or PipelineSettings()
    steps = steps or DemoSettings().steps
    root = build_dataset(out / "data")
    negatives = write_negatives(out / "negatives")
    print(
        f"demo data: {root / 'brick'} (60 good training images; 20 good and 24 defective test images); "
        f"negatives: {len(NEGATIVE_PHOTOS)} scikit-image photos"
    )
    train = open_dataset(data=root, category="brick")
    tuned = FinetuneFolder(out / "finetune")
    if tuned.kind == FinetuneFolder.KIND:  # the demo's own earlier fine-tuning
        shutil.rmtree(tuned.path)
    features = pipeline.features
    settings = FinetuneSettings().updated(
        backbone=features.backbone, image_size=features.image_size, steps=steps, checkpoint_every=steps
    )
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG  # the fine-tuning's diagnostics: with --verbose
    finetune_log = logging.getLogger("anomatune.finetune")
    level = finetune_log.level
    finetune_log.setLevel(logging.WARNING if quiet else level)
    try:
        report = finetune(train, negatives, tuned.path, settings, **runtime)
    finally:
        finetune_log.setLevel(level)
    print(kept_line(report))
    results = {}
    for name, weights in (("frozen", None), ("fine-tuned", str(tuned.path))):
        run_dir = out / f"{pipeline.detector.name}-{name}"
        Pipeline(pipeline, backbone_weights=weights, **runtime).fit(train).save(run_dir)
        results[name] = evaluate(run_dir, **runtime)
        results[name]["report"] = str(build_report(run_dir))
    print(f"\n{'':12s}{'image AUROC':>13s}{'pixel AUROC':>13s}{'AUPRO':>8s}{'F1 learnt thr.':>16s}")
    for name, r in results.items():
        print(
            f"{name:12s}{r['image_auroc']:13.3f}{r['pixel_auroc']:13.3f}{r['aupro']:8.3f}{r.get('f1_at_learnt_threshold', float('nan')):16.3f}"
        )
    f1 = {name: r.get("f1_at_learnt_threshold", float("nan")) for name, r in results.items()}
    if f1["fine-tuned"] < f1["frozen"] - 0.005:
        print(
            f"on these test images the fine-tuned run decides worse (F1 {f1['fine-tuned']:.3f} against "
            f"{f1['frozen']:.3f}): the validation chose its step without labels; the frozen run is the one to use"
        )
    print(f"\nreports: {results['frozen']['report']}, {results['fine-tuned']['report']}")
    return results


def kept_line(report: dict) -> str:
    """Whether the fine-tuning's step was kept, and why, in one line."""
    scores = {v["step"]: v["score"] for v in report.get("validation", [])}
    frozen = scores.get(0)
    if report["fallback"] or not report["kept_step"]:
        against = f" ({frozen:.4f})" if frozen is not None else ""
        return f"fine-tuning: not kept: no step beat the frozen backbone{against} on validation; the fine-tuned run uses the frozen one"
    kept = scores.get(report["kept_step"])
    detail = f" (validation {kept:.4f} against {frozen:.4f} frozen" if kept is not None and frozen is not None else " ("
    return f"fine-tuning: kept step {report['kept_step']}{detail}: the mean image AUROC over synthetic anomalies of held-out good images)"
