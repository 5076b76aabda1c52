"""The work of fit, finetune and evaluate for one category, and for every category at once.

A :class:`Job` is one command with its settings, for one category of a dataset root
(picklable, so that Ray can ship it). ``--category all`` runs a job per category, in this
process one after the other (``--engine local``) or as one Ray task each
(``--engine ray``), each writing its own folder ``ROOT/<category>``; then one summary
table of the categories, ``ROOT/summary.md`` and ``ROOT/summary.csv``, with the mean
of every metric over the categories that succeeded. A category that fails is a row with
its error: it never stops the others.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..allocator import tune_allocator
from ..data.settings import DataSettings
from ..distributed.settings import RAY, EngineSettings
from ..errors import AnomatuneError
from ..features.settings import RANDOM
from ..finetune.settings import FinetuneSettings
from ..pipeline.settings import PipelineSettings, RuntimeSettings
from ..validation.settings import ValidationSettings

log = logging.getLogger(__name__)

SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
SUMMARY_KEYS = ("detector", "image_auroc", "pixel_auroc", "aupro", "fit_seconds", "kept_step", "fallback")  # what the table shows


def fit(
    data: DataSettings,
    out: Path,
    settings: PipelineSettings,
    runtime: RuntimeSettings,
    evaluate: bool = False,
    figures: bool = True,
    validation: ValidationSettings | None = None,
) -> dict:
    """Fit and save a run in ``out`` (and evaluate it in the same process with ``evaluate``); with ``validation``,
    the detector is chosen by the search of ``--detector auto`` on that validation set."""
    from ..data.layouts import open_dataset
    from ..folders.base import refuse_inside
    from ..folders.kinds import ModelFolder
    from ..pipeline.pipeline import Pipeline

    refuse_inside(out, [*data.folders, *(validation.folders if validation else ())])  # before the fit, not after it
    start = time.perf_counter()
    model = ModelFolder(out)
    model.check_place()
    with model.claim():  # a second command on --out stops now, not after the fit
        if validation is None:
            pipeline = Pipeline(settings, **runtime.to_dict()).fit(open_dataset(data, "train"))
            pipeline.save(out)
        else:
            from ..validation.search import DetectorSearch

            search = DetectorSearch(settings, validation, cache=model, **runtime.to_dict())
            search.fit(open_dataset(data, "train")).save(out)
            pipeline = search.best_
    seconds = pipeline.fit_seconds_ if validation is None else round(time.perf_counter() - start, 2)
    result = {"run": str(out), "model": pipeline.model_id_, "version": pipeline.version_, "fit_seconds": seconds}
    if pipeline.image_calibration is not None:
        result["decision"] = pipeline.image_calibration.describe()
    if validation is not None:
        result["detector"], result["why"] = pipeline.selection_["winner"], pipeline.selection_["why"]
    if evaluate:
        from ..evaluation.evaluate import evaluate as evaluate_run

        result.update(evaluate_run(out, figures=figures, pipeline=pipeline))
    return result


def finetune(
    data: DataSettings,
    out: Path,
    settings: FinetuneSettings,
    runtime: RuntimeSettings,
    negatives: str | None = None,
    validation: ValidationSettings | None = None,
    resume: bool = False,
) -> dict:
    """Fine-tune a backbone into ``out``; the report of :meth:`Finetuner.run`."""
    from ..data.layouts import open_dataset
    from ..finetune.loop import Finetuner

    tuner = Finetuner(open_dataset(data, "train"), negatives, out, settings, validation, **runtime.to_dict())
    return {"out": str(out), **tuner.run(resume=resume)}


def evaluate(data: DataSettings | None, out: Path, runtime: RuntimeSettings, figures: bool = True) -> dict:
    """Evaluate the run in ``out`` on its own test split (or ``data``'s)."""
    from ..evaluation.evaluate import evaluate as evaluate_run

    return evaluate_run(out, data, figures=figures, **runtime.to_dict())


COMMANDS = {"fit": fit, "finetune": finetune, "evaluate": evaluate}
PATH_OPTIONS = ("negatives",)  # the options of a command that are paths


@dataclass(frozen=True)
class Job:
    """``command`` for each category of a root: ``ROOT/<category>`` is its folder (``--out``, or the run of evaluate).

    ``data`` is ``None`` for an evaluate that uses each run's own data.
    """

    command: str
    root: str
    data: DataSettings | None
    runtime: RuntimeSettings
    options: dict[str, Any] = field(default_factory=dict)

    def absolute(self) -> Job:
        """The same job with absolute paths: a Ray worker may run in another folder, or on another machine."""
        from ..data.layouts import absolute

        def full(path):
            return path if path in (None, RANDOM) else str(Path(path).expanduser().resolve())

        options = {k: full(v) if k in PATH_OPTIONS else v for k, v in self.options.items()}
        settings = options.get("settings")
        if isinstance(settings, PipelineSettings):
            options["settings"] = settings.updated(backbone_weights=full(settings.features.backbone_weights))
        validation = options.get("validation")
        if isinstance(validation, ValidationSettings):
            options["validation"] = validation.updated(
                validation_photos=full(validation.photos), validation_defects=full(validation.defects)
            )
        return replace(self, root=full(self.root), data=None if self.data is None else absolute(self.data), options=options)

    def categories(self) -> list[str]:
        """The data root's categories (fit, finetune), or the runs under the root (evaluate without --data)."""
        from ..data.layouts import list_categories
        from ..folders.kinds import ModelFolder

        if self.data is not None:
            return list_categories(self.data)
        runs = (
            sorted(p.name for p in Path(self.root).iterdir() if ModelFolder(p).kind == ModelFolder.KIND)
            if Path(self.root).is_dir()
            else []
        )
        if not runs:
            raise AnomatuneError(f"{self.root} holds no run folders: pass the --out of 'anomatune fit --category all'")
        return runs

    def __call__(self, category: str, device: str | None = None) -> dict:
        """Run the command for one category (``device`` overrides the runtime's: a Ray worker's GPU)."""
        options = dict(self.options)
        settings = options.get("settings")
        if self.command == "fit" and settings is not None:
            options["settings"] = with_category_weights(settings, category)
        runtime = self.runtime if device is None else self.runtime.updated(device=device)
        data = None if self.data is None else self.data.updated(category=category)
        return COMMANDS[self.command](data, Path(self.root) / category, runtime=runtime, **options)


def with_category_weights(settings: PipelineSettings, category: str) -> PipelineSettings:
    """``--backbone-weights ROOT``, the ``--out`` of a ``finetune --category all``, means ``ROOT/<category>``."""
    from ..folders.kinds import FinetuneFolder

    weights = settings.features.backbone_weights
    if not weights or FinetuneFolder(weights).kind == FinetuneFolder.KIND or not Path(weights).is_dir():
        return settings
    folder = Path(weights) / category
    return settings.updated(backbone_weights=str(folder)) if FinetuneFolder(folder).kind == FinetuneFolder.KIND else settings


def failed_row(category: str, message: str) -> dict:
    """A category's row of the summary when it failed: its error in one line."""
    return {"category": category, "status": "failed", "error": " ".join(message.split())[:500]}


def attempt(job: Job, category: str, device: str | None = None) -> dict:
    """One row of the summary: the category's results, or its error in one line (never raised)."""
    tune_allocator()  # a Ray worker is a fresh process
    start = time.perf_counter()
    try:
        result = job(category, device)
        row = {"category": category, "status": "ok", **result}
    except Exception as exc:  # a failing category is reported, the others go on
        log.debug("%s failed", category, exc_info=True)
        row = failed_row(category, str(exc) if isinstance(exc, AnomatuneError) else f"{type(exc).__name__}: {exc}")
        log.error("%s: %s", category, row["error"])
    return {**row, "seconds": round(time.perf_counter() - start, 1)}


def run_categories(job: Job, engine: EngineSettings, categories: Sequence[str] | None = None) -> list[dict]:
    """The job for every category (``categories``, default all of them), then the summary table in ``job.root``."""
    job = job.absolute()
    categories = list(categories or job.categories())
    log.info("%s on %d categories: %s", job.command, len(categories), ", ".join(categories))
    rows = _on_ray(job, categories, engine) if engine.engine == RAY else [attempt(job, c) for c in categories]
    write_summary(Path(job.root), rows)
    return rows


def _on_ray(job: Job, categories: list[str], engine: EngineSettings) -> list[dict]:
    """One Ray task per category, at most ``engine.workers`` at once; a worker lost for good is a failed row."""
    from tqdm.auto import tqdm

    from ..distributed.cluster import connect, plan_workers

    ray = connect(engine.address)
    plan = plan_workers(ray, engine.workers, job.runtime.device, cpus_per_worker=2)
    task = ray.remote(attempt).options(max_retries=1, **plan.ray_args)
    log.info(
        "%d categories on Ray: %d at once, %g CPU%s each",
        len(categories),
        plan.workers,
        plan.cpus,
        ", 1 GPU" if plan.device == "cuda" else "",
    )
    pending = {task.remote(job, c, plan.device): c for c in categories}
    rows = {}
    with tqdm(total=len(categories), desc=job.command) as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            category = pending.pop(ref)
            try:
                rows[category] = ray.get(ref)
            except Exception as exc:  # the worker died more times than Ray retries
                rows[category] = failed_row(category, str(exc))
            bar.update()
    return [rows[c] for c in categories]


def summary_columns(rows: Sequence[dict]) -> list[str]:
    shown = [k for k in SUMMARY_KEYS if any(k in r for r in rows)]
    return ["category", "status", *shown, "seconds", "error"]


def _mean_row(rows: Sequence[dict], columns: Sequence[str]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    mean = {"category": "mean", "status": f"{len(ok)}/{len(rows)} ok"}
    for key in columns[2:-1]:
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values and len(values) == len(ok):
            mean[key] = round(sum(values) / len(values), 4)
    return mean


def write_summary(root: Path, rows: Sequence[dict]) -> None:
    """``summary.md`` and ``summary.csv``: a row per category, then the mean over those that succeeded."""
    columns = summary_columns(rows)
    table = [*rows, _mean_row(rows, columns)]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns) + " |" for r in table]
    from ..folders.base import Folder

    folder = Folder(root)
    folder.write_text(SUMMARY_CSV, text.getvalue())
    folder.write_text(SUMMARY_MD, "\n".join(lines) + "\n")
    log.info("summary of %d categories in %s and %s", len(rows), root / SUMMARY_MD, SUMMARY_CSV)
