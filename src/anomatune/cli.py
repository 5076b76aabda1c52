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


@app.command("demo")
@click.option("--backbone", default="efficientnet_lite0", help="Backbone name (registered or timm).")
@click.option("--image-size", default=256, help="Side of the square input images in pixels.")
@click.option("--out", default="runs/demo", type=click.Path(), help="Folder for the demo's outputs.")
def demo_cmd(backbone: str, image_size: int, out: str) -> None:
    """Run the pipeline on images that ship with scikit-image (no data, no network needed)."""
    from .demo import run_demo

    run_demo(backbone=backbone, image_size=image_size, out=out)


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
