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
@click.option("--backbone-weights", type=click.Path(), default=None, help="Weights file (safetensors or state_dict), or an 'anomatune finetune' run folder.")
@click.option("--layers", default=None, help="Comma-separated stage indices; default: the backbone's (2,3 for EfficientNet-Lite).")
@click.option("--image-size", default=256, help="Images are resized to this square size in pixels.")
@click.option("--pool", default=3, help="Side of the average-pooling neighbourhood of patch features.")
@click.option("--proj-dim", default=None, type=int, help="Project features to this many dimensions (default: keep all).")
@click.option("--proj", default="random", type=click.Choice(["random", "pca"]), help="Projection kind when --proj-dim is set.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Detector setting, e.g. --set n_components=8 (repeatable).")
@click.option("--threshold-holdout", default=0.1, help="Share of the good training images held out to learn the decision threshold (0: none).")
@click.option("--threshold-quantile", default=0.99, help="Quantile of the held-out good images' scores that becomes the threshold.")
@click.option("--batch-size", default=8, help="Images per feature-extraction batch.")
@device_option
@click.option("--seed", default=0, help="Seed for the random projection and the held-out threshold images (a detector's own seed is a setting: --set seed=N).")
def fit_cmd(data, category, out, model, backbone, backbone_weights, layers, image_size, pool, proj_dim, proj, settings,
            threshold_holdout, threshold_quantile, batch_size, device, seed):
    """Fit a detector on the good training images of a category and save the run."""
    from .device import resolve_device
    from .runs import fit

    fit(data, category, out, model=model, backbone=backbone, backbone_weights=backbone_weights, layers=_parse_layers(layers),
        image_size=image_size, pool=pool, proj_dim=proj_dim, proj=proj, batch_size=batch_size, device=resolve_device(device),
        seed=seed, detector_settings=_parse_settings(settings), threshold_holdout=threshold_holdout,
        threshold_quantile=threshold_quantile)
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


def _setting_options(command):
    """One option per fine-tuning setting (``anomatune.finetune.settings``), with its default and help."""
    from .finetune.settings import CHOICES, setting_fields

    for name, kind, default, help_text in reversed(setting_fields()):
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=default, help=help_text)(command)
        else:
            kind = click.Choice(CHOICES[name]) if name in CHOICES else kind
            command = click.option(flag, name, type=kind, default=default, help=help_text)(command)
    return command


@app.command("finetune")
@click.option("--data", required=True, type=click.Path(), help="Dataset root in the MVTec AD layout.")
@click.option("--category", required=True, help="Category folder under --data.")
@click.option("--negatives", required=True, type=click.Path(), help="Folder of natural photos (searched recursively), e.g. ImageNet samples.")
@click.option("--out", required=True, type=click.Path(), help="Run folder: checkpoint, backbone.safetensors, diagnostics.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out (same settings; --steps may grow).")
@click.option("--dry-run", is_flag=True, help="Only diagnose the frozen features: gradient-weight distributions, no training.")
@device_option
@_setting_options
def finetune_cmd(data, category, negatives, out, resume, dry_run, device, **settings):
    """Fine-tune the backbone on a category's good images, guided by a density model (the paper's method).

    Then refit any detector on the fine-tuned features: anomatune fit --backbone-weights OUT ...
    """
    from .device import resolve_device
    from .finetune import FinetuneSettings
    from .finetune import diagnostics
    from .finetune.loop import dry_run as diagnose, finetune

    settings = FinetuneSettings(**settings)
    if dry_run:
        summary = diagnose(data, category, negatives, out, settings, device=resolve_device(device))
        click.echo(diagnostics.describe(summary))
        click.echo(f"histograms: {out}/dry_run_weights.png")
        return
    report = finetune(data, category, negatives, out, settings, device=resolve_device(device), resume=resume)
    click.echo(diagnostics.describe(report["end"]))
    click.echo(f"fine-tuned backbone in {out}; refit with: anomatune fit --backbone-weights {out} --backbone {settings.backbone} ...")


@app.command("color-transfer")
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.argument("more_rho", nargs=-1, type=float, metavar="")
@click.option("--rho", type=float, default=None, help="Transfer strengths, one column each: --rho 0.5 0.75 1 [default: 0.5 0.75 1].")
@click.option("--size", default=256, help="Images are resized to this square side.")
@click.option("--out", default="color_transfer.png", type=click.Path(), help="PNG to write.")
def color_transfer_cmd(source, target, more_rho, rho, size, out):
    """Map SOURCE's colours onto TARGET's: diagonal and Monge–Kantorovich rows (the supplementary's Figure 1)."""
    from .color import save_transfer_figure
    from .data import image_to_tensor, read_image

    rhos = (0.5, 0.75, 1.0) if rho is None else (rho, *more_rho)
    if any(not 0 <= r <= 1 for r in rhos):
        raise click.BadParameter(f"each rho must be in [0, 1], got {list(rhos)}", param_hint="--rho")
    save_transfer_figure(image_to_tensor(read_image(source), size), image_to_tensor(read_image(target), size), rhos, out)
    click.echo(f"figure saved in {out}")


@app.command("predict")
@click.argument("run", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder for results.csv, overlays/ and masks/.")
@click.option("--threshold", type=float, default=None, help="Decision threshold on the image score [default: the one the run learnt from held-out good images].")
@click.option("--batch-size", default=8, help="Images per batch.")
@device_option
def predict_cmd(run, images, out, threshold, batch_size, device):
    """Score IMAGES (files or folders) with RUN: score, good/defective, heatmap overlay and mask per image.

    Unreadable files are reported in results.csv and skipped; the exit code is 1 if any failed.
    """
    from .device import resolve_device
    from .inference import predict

    results = predict(run, images, out, threshold=threshold, batch_size=batch_size, device=resolve_device(device))
    failed = [r for r in results if r.error]
    defective = sum(r.decision == "defective" for r in results)
    click.echo(f"{len(results) - len(failed)} images scored, {defective} defective, {len(failed)} failed; {out}/results.csv")
    if failed:
        sys.exit(1)


@app.command("report")
@click.argument("run", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="HTML file to write [default: RUN/report.html].")
def report_cmd(run, out):
    """One self-contained HTML page for an evaluated RUN: metrics, curves, fine-tuning diagnostics, heatmaps."""
    from .report import build_report

    click.echo(f"report written to {build_report(run, out)}")


@app.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", default="onnx", type=click.Choice(["onnx", "torchscript"]), help="Model format.")
@click.option("--out", default=None, type=click.Path(), help="Model file [default: RUN/model.onnx or RUN/model.pt]; a .json with the preprocessing and threshold goes beside it.")
@click.option("--batch-size", default=1, help="Batch size the exported model takes (fixed at export).")
def export_cmd(run, fmt, out, batch_size):
    """Export RUN as one model (backbone + detector + upsampling + smoothing): normalised images in, maps and scores out."""
    from .deploy import export

    path = export(run, out, format=fmt, batch_size=batch_size)
    click.echo(f"model written to {path}; preprocessing and threshold in {path.with_suffix('.json')}")


@app.command("demo")
@click.option("--backbone", default="efficientnet_lite0", help="Backbone name (registered or timm).")
@click.option("--image-size", default=256, help="Side of the square input images in pixels.")
@click.option("--model", default="glad", type=click.Choice(["gmm", "glad", "padim", "patchcore"]), help="Detector fitted on the frozen and the fine-tuned backbone.")
@click.option("--steps", default=40, help="Fine-tuning steps (short: it is a demo).")
@click.option("--out", default="runs/demo", type=click.Path(), help="Folder for the demo's data, runs and reports.")
@device_option
def demo_cmd(backbone: str, image_size: int, model: str, steps: int, out: str, device: str) -> None:
    """Fit → fine-tune → evaluate → report on a dataset built from scikit-image's images (no data, no network needed)."""
    from .demo import run_demo
    from .device import resolve_device

    run_demo(backbone=backbone, image_size=image_size, out=out, device=resolve_device(device), model=model, steps=steps)


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
