"""Command line: ``anomatune <command> --help`` explains every option with its default.

Options are generated from the settings dataclasses (``apps.options``): every setting is
validated before any work starts, and a bad value, a missing folder or a damaged run
ends in one line on stderr with exit code 2, never a traceback. Heavy modules (torch)
are imported inside the commands, so ``--help`` and option errors stay fast.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
from pathlib import Path

import click

from .. import __version__
from ..allocator import tune_allocator
from ..data.settings import ALL_CATEGORIES, DataSettings
from ..distributed.settings import RAY, EngineSettings
from ..errors import AnomatuneError
from ..features.settings import FeatureSettings
from ..finetune.settings import FinetuneSettings
from ..inference.settings import ExportSettings, PredictSettings
from ..line.settings import MqttSettings, WatchSettings
from ..models.settings import UpdateSettings
from ..pipeline.settings import PipelineSettings, RuntimeSettings
from ..serve.settings import API_KEY_ENV, ServeSettings
from ..store.settings import StoreSettings
from ..validation.settings import AUTO_DETECTOR, ValidationSettings
from . import options
from .jobs import SUMMARY_CSV, SUMMARY_MD, Job, evaluate, finetune, fit, run_categories
from .settings import ColorTransferSettings, DemoSettings

log = logging.getLogger("anomatune")
DISK_ERRORS = {  # what the disk refused, said in one line instead of a traceback
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}

CONFIG_OPTION = click.option(
    "--config",
    type=click.Path(),
    default=None,
    help="YAML file of settings (the groups features, detector, postprocess, threshold, ...; "
    "a model folder, or a version's config.yaml, works too); options given here override it.",
)
DEVICE_ONLY = ("device",)
# the fine-tuning's validation set; its held-out share and fit images are FinetuneSettings' (0: no validation)
FINETUNE_VALIDATION = ("validation_max_images", "validation_families", "validation_photos", "validation_defects")
DEVICE_AND_LIMIT = ("device", "max_pixels")  # commands that read images one by one, whatever their batch
SERVED_HOT_FOLDER = ("in", "after", "settle", "poll", "interval", "batch", "overlays")  # serve --in: watch, but never --once
NO_FIGURES_OPTION = click.option("--no-figures", is_flag=True, help="Skip the ROC, PRO and heatmap PNGs and the gallery.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 120})
@click.version_option(__version__, prog_name="anomatune")
@click.option("-v", "--verbose", is_flag=True, help="Log every step (debug level).")
def app(verbose: bool) -> None:
    """Industrial visual anomaly detection with model-guided contrastive fine-tuning.

    Data: your own folder of good images (--good DIR, with --defect DIR and --masks DIR to
    evaluate), an MVTec AD category (--data ROOT --category C) or a VisA category (--data
    ROOT --category C, with ROOT/split_csv/1cls.csv).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="anomatune: %(levelname)s: %(message)s")
    logging.getLogger("timm").setLevel(logging.WARNING)


app.command_class = options.GroupedCommand  # --help: the options under one heading per settings group


@app.command("backbones")
def backbones_cmd() -> None:
    """List the backbones whose weights ship in a package, with their default feature layers."""
    from ..features.backbones import create_backbone, list_backbones
    from ..features.extractor import FeatureExtractor

    for name in list_backbones():
        try:
            extractor = FeatureExtractor(FeatureSettings(backbone=name), backbone=create_backbone(name))
        except AnomatuneError as exc:
            click.echo(f"{name:20s} unavailable: {exc}")
            continue
        click.echo(
            f"{name:20s} layers {list(extractor.layers)}  channels {list(extractor.stage_channels)}  weights {extractor.weights_id}"
        )


@app.command("detectors")
def detectors_cmd() -> None:
    """List the detectors and their settings (set them with --set KEY=VALUE), with defaults."""
    from ..models.settings import DetectorSettings
    from ..schema import flat_settings

    for name, cls in DetectorSettings.registry.items():
        click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for flat in flat_settings(cls):
            click.echo(f"  {flat.key} = {flat.default!r}: {flat.help}" + (f" Range: {flat.interval}." if flat.interval else ""))


@app.command("fit")
@options.options(DataSettings)
@options.options(PipelineSettings, defaults={"detector": AUTO_DETECTOR})
@options.options(ValidationSettings)
@options.options(RuntimeSettings)
@options.options(EngineSettings)
@CONFIG_OPTION
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Model folder: a new one, or an existing model, to which the fit is added as a new version and served "
    "(the older versions stay; with --category all: a model folder per category inside it).",
)
@click.option(
    "--evaluate",
    "then_evaluate",
    is_flag=True,
    help="Then evaluate on the data's test split in the same process, as 'anomatune evaluate OUT' would (start-up paid once).",
)
@NO_FIGURES_OPTION
def fit_cmd(out, config, then_evaluate, no_figures, **values):
    """Fit a detector on good images and save the run, with a threshold at --false-alarm-rate of good parts.

    Every good image is fitted on, and scored by a model fitted without its fold: those scores set the threshold.

    The detector is chosen (--detector auto, the default unless --config names one): each candidate (--search-*) is
    scored on a validation set made from held-out good images with synthetic anomalies (--validation-*), and the
    best is refit on every image. --detector NAME fixes one.
    With --category all: a run per category of --data in OUT/<category>, and OUT/summary.md.
    """
    detector = values.get("detector")
    auto = detector == AUTO_DETECTOR or (detector is None and "detector" not in options.read_settings_file(config))
    if auto:
        if values.get("detector_changes"):
            raise click.UsageError(
                "--detector auto chooses every detector's settings: drop --set"
                if detector
                else "--set changes a fixed detector's settings: add --detector NAME (without one, fit chooses the detector)"
            )
        values["detector"] = None
    data = options.build(DataSettings, values)
    settings = options.build(PipelineSettings, values, config=config)
    job = Job(
        "fit",
        out,
        data,
        options.build(RuntimeSettings, values),
        {
            "settings": settings,
            "evaluate": then_evaluate,
            "figures": not no_figures,
            "validation": options.build(ValidationSettings, values) if auto else None,
        },
    )
    if run_all(job, options.build(EngineSettings, values), data.category):
        return
    result = fit(data, Path(out), runtime=job.runtime, **job.options)
    if "why" in result:
        click.echo(f"detector: {result['detector']}, chosen for its {result['why']}")
    click.echo(f"{result['model']} saved in {out} as version {result['version']}, served" + (
        f"; {result['decision']}" if result.get("decision") else ""))  # fmt: skip
    if then_evaluate:
        echo_metrics(out, result)


@app.command("evaluate")
@click.argument("run", type=click.Path())
@options.options(DataSettings)
@options.options(RuntimeSettings)
@options.options(EngineSettings)
@NO_FIGURES_OPTION
def evaluate_cmd(run, no_figures, **values):
    """Score the test split (of the run's data unless given): the served version's evaluation/ (RUN/versions/vN/evaluation/) with metrics, curves and heatmaps.

    With --category all: every run under RUN (the --out of 'fit --category all'), and RUN/summary.md.
    """
    data = options.build(DataSettings, values)
    job = Job("evaluate", run, data if data.given else None, options.build(RuntimeSettings, values), {"figures": not no_figures})
    if run_all(job, options.build(EngineSettings, values), data.category):
        return
    echo_metrics(run, evaluate(job.data, Path(run), job.runtime, not no_figures))


def run_all(job: Job, engine: EngineSettings, category: str | None) -> bool:
    """With --category all: ``job`` for every category, then its summary; exit 1 if one failed. False otherwise."""
    if category != ALL_CATEGORIES:
        if engine.engine == RAY:
            raise click.UsageError(f"--engine ray runs {job.command} on every category of a dataset root: add --category all")
        return False
    rows = run_categories(job, engine)
    click.echo(Path(job.root, SUMMARY_MD).read_text(), nl=False)
    failed = [r["category"] for r in rows if r["status"] != "ok"]
    click.echo(
        f"{len(rows) - len(failed)} of {len(rows)} categories done"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f" ({Path(job.root, SUMMARY_MD)}, {SUMMARY_CSV})"
    )
    if failed:
        sys.exit(1)
    return True


def echo_metrics(run: str, result: dict) -> None:
    """The three metrics, ``n/a`` where the test data cannot give one (the log said why)."""

    def shown(value) -> str:
        return "n/a" if value is None or value != value else str(value)

    from ..folders.kinds import EvaluationFolder, open_run

    metrics = "  ".join(f"{k.replace('_', ' ')} {shown(result[k])}" for k in ("image_auroc", "pixel_auroc", "aupro"))
    click.echo(f"{metrics}  ({open_run(run).evaluation / EvaluationFolder.METRICS})")


@app.command("finetune")
@options.options(DataSettings)
@click.option(
    "--negatives",
    type=click.Path(),
    help="Folder of natural photos (searched recursively), e.g. ImageNet samples; needed by the photos and pasted negatives.",
)
@options.options(ValidationSettings, only=FINETUNE_VALIDATION)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Fine-tuning folder: checkpoint, backbone.safetensors, diagnostics "
    "(with --category all: a folder per category inside it).",
)
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out (same settings; --steps may grow).")
@click.option("--dry-run", is_flag=True, help="Only diagnose the frozen features: gradient-weight distributions, no training.")
@options.options(FinetuneSettings)
@options.options(RuntimeSettings, only=DEVICE_AND_LIMIT)
@options.options(EngineSettings)
@CONFIG_OPTION
def finetune_cmd(negatives, out, resume, dry_run, config, **values):
    """Fine-tune the backbone on good images, guided by a density model (the paper's method).

    Then refit any detector on the fine-tuned features: anomatune fit --backbone-weights OUT ...
    On several GPUs (or CPU processes), --mode backbone runs under torchrun: torchrun --nproc_per_node N
    $(which anomatune) finetune ... (the same global batch, split between the processes).
    With --category all: a fine-tuning per category of --data in OUT/<category>, and OUT/summary.md;
    'fit --category all --backbone-weights OUT' then uses each category's own.
    """
    data = options.build(DataSettings, values)
    settings = options.build(FinetuneSettings, values, config=config)
    runtime = options.build(RuntimeSettings, values)
    engine = options.build(EngineSettings, values)
    validation = options.build(ValidationSettings, {k: values.get(k) for k in FINETUNE_VALIDATION})
    job = Job(
        "finetune",
        out,
        data,
        runtime,
        {"settings": settings, "negatives": negatives, "validation": validation, "resume": resume},
    )
    if dry_run:
        if data.category == ALL_CATEGORIES or engine.engine == RAY:
            raise click.UsageError("--dry-run diagnoses one category in this process: drop --category all and --engine ray")
        from ..data.layouts import open_dataset
        from ..finetune import diagnostics
        from ..finetune.loop import dry_run as diagnose_frozen

        click.echo(
            diagnostics.summary_text(
                diagnose_frozen(open_dataset(data, "train"), negatives, out, settings, validation, **runtime.to_dict())
            )
        )
        click.echo(f"histograms: {out}/dry_run_weights.png")
        return
    if run_all(job, engine, data.category):
        return
    from ..finetune import diagnostics

    report = finetune(data, Path(out), runtime=runtime, **job.options)
    if report.get("rank"):  # under torchrun, rank 0 speaks for every process
        return
    click.echo(diagnostics.summary_text(report["end"]))
    if report["fallback"]:
        click.echo(f"no checkpoint beat the frozen backbone on validation: {out} holds the frozen backbone (fallback)")
    click.echo(
        f"fine-tuned backbone in {out} (step {report['kept_step']}); refit with: "
        f"anomatune fit --backbone-weights {out} --backbone {settings.features.backbone} ..."
    )


@app.command("predict")
@click.argument("run", type=click.Path())
@click.argument("inputs", nargs=-1, type=click.Path(), metavar="[IMAGES]...")
@options.options(DataSettings)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Folder for results.csv (results.parquet/ with --engine ray), overlays/ and masks/, replaced as one set.",
)
@options.options(PredictSettings)
@options.options(RuntimeSettings)
@options.options(EngineSettings)
def predict_cmd(run, inputs, out, **values):
    """Score IMAGES with RUN: score, decision, overlay and mask per image.

    IMAGES are files, folders (searched recursively), glob patterns ('parts/**/*.png', quoted)
    or CSV/Parquet manifests with a 'path' column, and the test split of --data/--good; with
    neither, the test split of the data RUN was fitted on.
    Unreadable files are reported in the results and skipped; the exit code is 1 if any failed.
    """
    data = options.build(DataSettings, values)
    predict_settings = options.build(PredictSettings, values)
    runtime = options.build(RuntimeSettings, values)
    engine = options.build(EngineSettings, values)
    from ..folders.kinds import PredictionsFolder

    chosen = {"threshold": predict_settings.threshold, "images": predict_settings.images, "data": data, **runtime.to_dict()}
    if engine.engine == RAY:
        from ..distributed.batch import predict_on_ray

        tally = predict_on_ray(run, inputs, out, engine=engine, **chosen)
        scored, defective, failed, results = tally.scored, tally.defective, tally.failed, PredictionsFolder.RESULTS_PARQUET
    else:
        from ..inference.predict import predict

        rows = predict(run, inputs, out, **chosen)
        failed = sum(bool(r.error) for r in rows)
        scored, defective, results = len(rows) - failed, sum(r.decision == "defective" for r in rows), PredictionsFolder.RESULTS
        if len(rows) <= PREDICT_TABLE:
            for row in rows:
                click.echo(f"  {Path(row.path).name:32s} {prediction_text(row)}")
    click.echo(f"{scored} image{'' if scored == 1 else 's'} scored, {defective} defective, {failed} failed; {out}/{results}")
    if failed:
        sys.exit(1)


PREDICT_TABLE = 20  # predict prints a line per image up to this many, then only the summary


def prediction_text(row) -> str:
    """One image's result for the terminal: its decision, calibrated and raw score (or why it failed)."""
    if row.error:
        return f"failed: {row.error}"
    calibrated = "" if row.normalized_score is None else f", calibrated {row.normalized_score:.2f} (0.50 = threshold)"
    return f"{row.decision:9s} score {row.score:.4g}{calibrated}"


PROMOTE_OPTION = click.option(
    "--promote/--no-promote",
    default=True,
    help="Serve the new version (move the model's 'served' alias to it); --no-promote keeps it as a candidate "
    "for 'anomatune promote'.",
)


@app.command("update")
@click.argument("run", type=click.Path())
@click.option("--good", type=click.Path(), default=None, help="Folder of new good images (every image in it is used).")
@click.option(
    "--feedback",
    is_flag=True,
    help="Also the operator's feedback (RUN/feedback/, from the server's POST /feedback): the last verdict on each "
    "part counts; parts marked good join the training images, once; confirmed defects go to the version's defects/ "
    "(a validation set), never into training.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(),
    help="A new model folder for the updated version instead of a new version of RUN [default: RUN].",
)
@PROMOTE_OPTION
@click.option(
    "--evaluate",
    "then_evaluate",
    is_flag=True,
    help="Score both versions on the same labelled images: the test split of RUN's data when it holds defects, "
    "else --good-test/--defect/--masks; lineage.json keeps both.",
)
@options.options(DataSettings, only=("good_test", "defect", "masks"))
@options.options(UpdateSettings)
@options.options(StoreSettings, only=("store",))
@options.options(RuntimeSettings)
def update_cmd(run, good, feedback, out, promote, then_evaluate, **values):
    """A new version of the model RUN that has also learnt the good images of --good, without re-reading its
    training images; the versions before it stay, and 'anomatune promote' rolls back.

    PaDiM equals a refit on all the images; PatchCore's bank takes the new patches its streamed fit would keep;
    GMM and GLAD take online-EM steps (--em-steps, --new-weight). The new images are scored by the served version
    before it learns them; their scores join the calibration and the threshold is learnt again at the same rate.
    Each image is learnt once. lineage.json records the parent, the images added and, with --evaluate, both
    versions' metrics.
    """
    test = options.build(DataSettings, values)
    if test.defect or test.good_test or test.masks:
        if not (test.defect and test.good_test):
            raise click.UsageError("--good-test and --defect go together: the labelled images both versions are scored on")
        test = test.updated(good=test.good_test)
    else:
        test = None
    settings, runtime = options.build(UpdateSettings, values), options.build(RuntimeSettings, values)  # before torch
    from ..pipeline.update import update_run

    result = update_run(
        run, good, out, feedback=feedback, evaluate=then_evaluate, test_data=test, promote=promote, settings=settings,
        runtime=runtime, inspections=options.build(StoreSettings, values),
    )  # fmt: skip
    added = len(result["added_images"])
    click.echo(
        f"version {result['version']} ({result['model']}, parent {result['parent']}): {added} image"
        f"{'' if added == 1 else 's'} added in {result['update_seconds']} s; "
        f"{'served' if promote else 'not served (anomatune promote)'}; in {result['run']}"
    )
    metrics = result["metrics"]
    if metrics:
        for version in ("parent", "updated"):
            click.echo(f"{version}: " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in metrics[version].items()))


@app.command("threshold")
@click.argument("run", type=click.Path())
@options.options(PipelineSettings, only=("false_alarm_rate", "threshold_quantile", "threshold_value"))
@PROMOTE_OPTION
def threshold_cmd(run, promote, **values):
    """A new version of the model RUN that decides by a new threshold: a false-alarm rate, a quantile or a value.

    Learnt from the same out-of-fold scores of the good images; the tensors are shared with the version before.
    """
    from ..pipeline.update import threshold_version

    result = threshold_version(run, promote=promote, **values)
    click.echo(f"version {result['version']} ({result['model']}): {result['decision']}" + ("" if promote else " (not served)"))


@app.command("versions")
@click.argument("run", type=click.Path())
def versions_cmd(run):
    """List the versions of the model RUN: id, parent, time, command, images, metrics when evaluated, which is served."""
    from ..folders.kinds import ModelFolder

    model = ModelFolder(run).require()
    served = model.served_name()
    for name in model.versions():
        version = model.version(name)
        record = version.read_json(version.VERSION)
        fitted = version.read_yaml(version.CONFIG).get("fitted") or {}
        metrics = version.evaluation / "metrics.json"
        scores = json.loads(metrics.read_text()) if metrics.is_file() else {}
        shown = "  ".join(f"{k} {scores[k]:.3f}" for k in ("image_auroc", "aupro") if isinstance(scores.get(k), float))
        click.echo(
            f"{'*' if name == served else ' '} {name:5s} {model.path.resolve().name}@{record['digest']}  "
            f"{record['command']:9s} parent {record.get('parent') or '-':5s} {record['time']}  "
            f"{fitted.get('n_train', '?')} images  threshold "
            + (f"{fitted['threshold']:.4g}" if isinstance(fitted.get("threshold"), float) else "none")
            + (f"  {shown}" if shown else "")
        )
    click.echo("* served")


@app.command("promote")
@click.argument("run", type=click.Path())
@click.argument("version")
def promote_cmd(run, version):
    """Serve VERSION of the model RUN (v3, 3 or its id): a rollback is a promote of an older version.

    A server started with --watch follows within its period; otherwise POST /models/NAME/reload.
    """
    from ..folders.kinds import ModelFolder

    chosen = ModelFolder(run).require()
    promoted = chosen.promote(version)
    click.echo(f"{run}: serving version {promoted.path.name}")


@app.command("prune")
@click.argument("run", type=click.Path())
@click.option("--keep", type=click.IntRange(min=1), required=True, help="How many of the latest versions to keep.")
def prune_cmd(run, keep):
    """Remove the old versions of the model RUN (with their exports and evaluations), keeping the last --keep and
    always the served one."""
    from ..folders.kinds import ModelFolder

    removed = ModelFolder(run).require().remove(keep)
    click.echo(f"{run}: removed {', '.join(removed) if removed else 'nothing'}")


@app.command("report")
@click.argument("run", type=click.Path())
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="HTML file to write [default: report.html in the served version's folder].",
)
def report_cmd(run, out):
    """One self-contained HTML page for an evaluated RUN: metrics, curves, fine-tuning diagnostics, heatmaps."""
    from ..inference.report import build_report

    click.echo(f"report written to {build_report(run, out)}")


@app.command("export")
@click.argument("run", type=click.Path())
@options.options(ExportSettings)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Model file [default: in the served version's folder, model.onnx, model.pt or model.xml]; its sidecar "
    "MODEL_FILE.json (preprocessing, outputs, threshold, calibration, version) goes beside it.",
)
def export_cmd(run, out, **values):
    """Export RUN as one model (backbone + detector + upsampling + smoothing): normalised images in, maps and scores out."""
    settings = options.build(ExportSettings, values)
    from ..inference.export import export, sidecar

    path = export(run, out, settings)
    click.echo(f"model written to {path}; preprocessing, threshold and calibration in {sidecar(path)}")


@app.command("serve")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@options.options(ServeSettings)
@options.options(StoreSettings)
@options.options(WatchSettings, only=SERVED_HOT_FOLDER)
@options.options(MqttSettings)
@options.options(RuntimeSettings, only=DEVICE_AND_LIMIT)
def serve_cmd(runs, **values):
    """Serve RUNS over HTTP: POST /predict, GET /health, /models, /inspections, /docs, and a page for the operator
    at /; with --in DIR, also score the images a camera writes into DIR (as anomatune watch does).

    Listens on 127.0.0.1 only unless --host says otherwise. Needs the serve extra: pip install 'anomatune[serve]'.
    """
    settings = options.build(ServeSettings, values)
    runtime = options.build(RuntimeSettings, values)
    store, watch = options.build(StoreSettings, values), options.build(WatchSettings, values)
    if watch.folder is not None and len(runs) != 1:
        raise AnomatuneError("--in scores a hot folder with one model: serve one run with it")
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings = settings.updated(api_key=os.environ[API_KEY_ENV])
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise AnomatuneError(f"anomatune serve needs {exc.name}: pip install 'anomatune[serve]'") from None
    from ..serve.models import ServedModel, check_run_names

    check_run_names(runs)  # before minutes of loading
    check_port_free(settings.host, settings.port)
    models = [
        ServedModel.load(run, settings.runtime, runtime.device, settings.max_batch, max_pixels=runtime.max_pixels) for run in runs
    ]
    ids = [m.id for m in models]
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("listening on %s without --api-key: anyone who reaches this machine can use the server", settings.host)
    click.echo(f"serving {', '.join(ids)} on http://{settings.host}:{settings.port}/ (API docs at /docs)")
    watcher = None
    if watch.folder is not None:
        from ..line.hotfolder import Watcher

        watcher = Watcher(runs[0], watch, options.build(MqttSettings, values), store, **runtime.to_dict())
        threading.Thread(target=watcher.run, name="anomatune-watch", daemon=True).start()
        click.echo(f"watching {watcher.folder.path}; inspections in {watcher.store.url}")
    try:
        uvicorn.run(create_app(models, settings, store), host=settings.host, port=settings.port, log_level="warning")
    finally:
        if watcher is not None:
            watcher.stop()


@app.command("watch")
@click.argument("model", type=click.Path())
@options.options(WatchSettings)
@options.options(StoreSettings)
@options.options(MqttSettings)
@options.options(RuntimeSettings, only=DEVICE_AND_LIMIT)
def watch_cmd(model, **values):
    """Score every image a camera writes into a folder with MODEL's served version, each exactly once across
    restarts: the result in the inspections store, the image moved to done/ or failed/, the verdict over MQTT.

    Stop it with Ctrl-C (or a kill: nothing is lost). MQTT and file events need pip install 'anomatune[line]'.
    """
    from ..line.hotfolder import Watcher

    settings, mqtt = options.build(WatchSettings, values), options.build(MqttSettings, values)
    runtime = options.build(RuntimeSettings, values)
    watcher = Watcher(model, settings, mqtt, options.build(StoreSettings, values), **runtime.to_dict())
    click.echo(f"watching {watcher.folder.path} with {watcher.pipeline.model_id_}; inspections in {watcher.store.url}")
    try:
        scored = watcher.run()
    except KeyboardInterrupt:
        scored = watcher.scored
    click.echo(f"{scored} images scored")


def check_port_free(host: str, port: int) -> None:
    """One line now, before the runs load, when ``host:port`` is taken (uvicorn would find out only after)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise AnomatuneError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None


@app.command("color-transfer")
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path())
@click.argument("more_rho", nargs=-1, metavar="")
@options.options(ColorTransferSettings)
@click.option("--out", default="color_transfer.png", type=click.Path(dir_okay=False), help="PNG to write.")
def color_transfer_cmd(source, target, more_rho, out, **values):
    """Map SOURCE's colours onto TARGET's: diagonal and Monge–Kantorovich rows (the supplementary's Figure 1)."""
    if more_rho and values.get("rho"):
        values["rho"] = ",".join((values["rho"], *more_rho))
    settings = options.build(ColorTransferSettings, values)
    from ..data.color import save_transfer_figure
    from ..data.images import image_to_tensor, read_image

    size = (settings.size, settings.size)
    save_transfer_figure(image_to_tensor(read_image(source), size), image_to_tensor(read_image(target), size), settings.rho, out)
    click.echo(f"figure saved in {out}")


DEMO_PIPELINE = ("backbone", "image_size", "detector")


@app.command("demo")
@options.options(PipelineSettings, only=DEMO_PIPELINE)
@options.options(DemoSettings)
@click.option(
    "--out", default="runs/demo", type=click.Path(file_okay=False), help="Folder for the demo's data, runs and reports."
)
@options.options(RuntimeSettings, only=DEVICE_ONLY)
def demo_cmd(out, **values):
    """Fine-tune → fit → evaluate → report on a dataset built from scikit-image's images (no data, no network needed)."""
    pipeline = options.build(PipelineSettings, values)
    demo = options.build(DemoSettings, values)
    runtime = options.build(RuntimeSettings, values)
    from .demo import run_demo

    run_demo(out, pipeline, demo.steps, **runtime.to_dict())


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    tune_allocator()
    try:
        app(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("anomatune: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AnomatuneError as exc:
        click.echo(f"anomatune: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(
            f"anomatune: error: {DISK_ERRORS[exc.errno]}{where}: {exc.strerror}. Nothing already written was changed "
            "(every file is written to a temporary name first); fix it and run the command again",
            err=True,
        )
        sys.exit(2)
