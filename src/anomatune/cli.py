"""Command line: ``anomatune <command> --help`` explains every option with its default."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__
from .errors import AnomatuneError

log = logging.getLogger("anomatune")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="anomatune")
@click.option("-v", "--verbose", is_flag=True, help="Log every step (debug level).")
def app(verbose: bool) -> None:
    """Industrial visual anomaly detection with model-guided contrastive fine-tuning."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="anomatune: %(levelname)s: %(message)s")
    logging.getLogger("timm").setLevel(logging.WARNING)


@app.command("backbones")
def backbones_cmd() -> None:
    """List the backbones whose weights ship in a package, with their default feature layers."""
    from .backbones import create_backbone, list_backbones
    from .features import FeatureExtractor

    for name in list_backbones():
        try:
            extractor = FeatureExtractor(create_backbone(name))
        except AnomatuneError as exc:
            click.echo(f"{name:20s} unavailable: {exc}")
            continue
        click.echo(f"{name:20s} layers {list(extractor.layers)}  channels {list(extractor.stage_channels)}  weights {extractor.weights_id}")


device_option = click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N.")


def _parse_layers(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated stage indices like 2,3, not {value!r}") from exc


def _parse_settings(pairs: tuple[str, ...]) -> dict:
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, not {pair!r}")
        settings[key.replace("-", "_")] = yaml.safe_load(value)
    return settings


@app.command("fit")
@click.option("--data", required=True, type=click.Path(), help="Dataset root in the MVTec AD layout (holds the category folders).")
@click.option("--category", required=True, help="Category folder under --data, e.g. transistor.")
@click.option("--out", required=True, type=click.Path(), help="Run folder to write (config.yaml + safetensors).")
@click.option("--model", default="glad", type=click.Choice(["gmm", "glad", "padim", "patchcore"]), help="Detector.")
@click.option("--backbone", default="efficientnet_lite0", help="Backbone: a packaged name (see 'anomatune backbones') or a timm name.")
@click.option("--backbone-weights", type=click.Path(), default=None, help="Weights file (safetensors or state_dict) for the backbone.")
@click.option("--layers", default=None, help="Comma-separated stage indices; default: the backbone's (2,3 for EfficientNet-Lite).")
@click.option("--image-size", default=256, help="Images are resized to this square size in pixels.")
@click.option("--pool", default=3, help="Side of the average-pooling neighbourhood of patch features.")
@click.option("--proj-dim", default=None, type=int, help="Project features to this many dimensions (default: keep all).")
@click.option("--proj", default="random", type=click.Choice(["random", "pca"]), help="Projection kind when --proj-dim is set.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Detector setting, e.g. --set n_components=8 (repeatable).")
@click.option("--batch-size", default=8, help="Images per feature-extraction batch.")
@device_option
@click.option("--seed", default=0, help="Seed for subsampling, projections and initialisation.")
def fit_cmd(data, category, out, model, backbone, backbone_weights, layers, image_size, pool, proj_dim, proj, settings, batch_size, device, seed):
    """Fit a detector on the good training images of a category and save the run."""
    from .device import resolve_device
    from .runs import fit

    fit(data, category, out, model=model, backbone=backbone, backbone_weights=backbone_weights, layers=_parse_layers(layers),
        image_size=image_size, pool=pool, proj_dim=proj_dim, proj=proj, batch_size=batch_size, device=resolve_device(device),
        seed=seed, detector_settings=_parse_settings(settings))
    click.echo(f"run saved in {out}")


@app.command("evaluate")
@click.argument("run", type=click.Path())
@click.option("--data", default=None, type=click.Path(), help="Dataset root; default: the one the run was fitted on.")
@click.option("--category", default=None, help="Category; default: the one the run was fitted on.")
@click.option("--batch-size", default=8, help="Images per batch.")
@device_option
@click.option("--no-figures", is_flag=True, help="Skip the ROC, PRO and heatmap PNGs.")
def evaluate_cmd(run, data, category, batch_size, device, no_figures):
    """Score the test split: metrics.json, metrics.md, ROC/PRO curves and heatmaps in the run folder."""
    from .device import resolve_device
    from .runs import evaluate

    result = evaluate(run, data, category, batch_size=batch_size, device=resolve_device(device), figures=not no_figures)
    click.echo(f"image AUROC {result['image_auroc']}  pixel AUROC {result['pixel_auroc']}  AUPRO {result['aupro']}  ({run}/metrics.json)")


@app.command("demo")
@click.option("--backbone", default="efficientnet_lite0", help="Backbone name (registered or timm).")
@click.option("--image-size", default=256, help="Side of the square input images in pixels.")
@click.option("--out", default="runs/demo", type=click.Path(), help="Folder for the demo's data and runs.")
@device_option
def demo_cmd(backbone: str, image_size: int, out: str, device: str) -> None:
    """Fit and evaluate each detector on a dataset built from scikit-image's images (no data, no network needed)."""
    from .demo import run_demo
    from .device import resolve_device

    run_demo(backbone=backbone, image_size=image_size, out=out, device=resolve_device(device))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AnomatuneError as exc:
        click.echo(f"anomatune: error: {exc}", err=True)
        sys.exit(2)
