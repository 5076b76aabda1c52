"""``anomatune update``: a new version of a model from its served version and new good images, without a refit.

The new version is written beside the old ones (never over them) and served unless told
otherwise; a bad update is rolled back with ``anomatune promote``. Its ``lineage.json``
holds its parent's model id and version, the good images and feedback parts added, the
settings, the time it took, the metrics of both versions on labelled data when asked, and
the lineage of the parent (its ancestors). The operator's feedback (``FeedbackStore``, in
the model's folder) joins as follows: the last verdict on each part counts; parts marked good
(false alarms) become training images once; confirmed defects never do, they are copied into
the version's ``defects/`` folder, a validation set of real defects (``--validation-defects``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from ..data.datasets import GOOD, AnomalyDataset, Record, require_dir
from ..data.images import list_images
from ..data.settings import DataSettings
from ..errors import AnomatuneError, RunFolderError
from ..folders.base import Folder, refuse_inside
from ..folders.feedback import FeedbackStore
from ..folders.kinds import ModelFolder, open_run
from ..metrics import MAIN_METRICS
from ..models.settings import UpdateSettings
from ..store import InspectionStore, StoreSettings
from .pipeline import Pipeline
from .settings import RuntimeSettings

log = logging.getLogger(__name__)

DEFECTS = "defects"  # in a run: the confirmed defects of its lineage (images, and masks when every one has one)


def lineage_chain(lineage: dict | None) -> list[dict]:
    """A lineage's own entry (without its ancestors) and its ancestors' entries, newest first: a new version's
    ``ancestors`` when ``lineage`` is its parent's."""
    if not lineage:
        return []
    return [{k: v for k, v in lineage.items() if k != "ancestors"}, *lineage.get("ancestors", [])]


def consumed_feedback(lineage: dict | None) -> set[str]:
    """The feedback parts a version's lineage has already used (training images or defects)."""
    return {p for entry in lineage_chain(lineage) for p in entry.get("feedback_good", []) + entry.get("feedback_defects", [])}


def learnt_as_good(lineage: dict | None) -> set[str]:
    return {p for entry in lineage_chain(lineage) for p in entry.get("feedback_good", [])}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def update_run(
    run: str | Path,
    good: str | Path | None,
    out: str | Path | None = None,
    *,
    feedback: bool = False,
    evaluate: bool = False,
    test_data: DataSettings | None = None,
    promote: bool = True,
    settings: UpdateSettings | None = None,
    runtime: RuntimeSettings | None = None,
    inspections: StoreSettings | None = None,
) -> dict[str, Any]:
    """Add to the model at ``run`` (or write to the new model folder ``out``) a version of its served one updated
    with the good images of ``good`` and, with ``feedback``, the parts marked good (the verdicts of the
    ``inspections`` store, default: the model's own); with ``evaluate``, both versions are scored on ``test_data``
    (default: the run's own test split, when it holds defects). Returns the lineage written."""
    run = Path(run)
    source = open_run(run)
    model = source.model_path if source.is_version else None
    out = Path(out) if out is not None else (model or run)
    same_model = model is not None and out.expanduser().resolve() == model.resolve()
    if not same_model and Folder(out).kind is not None:
        raise RunFolderError(
            f"{out} holds {'another model' if Folder(out).kind == ModelFolder.KIND else 'other files'}: an update adds a "
            f"version to its own model (leave --out out, or pass {model or run}) or writes a new folder"
        )
    settings = settings or UpdateSettings()
    runtime = runtime or RuntimeSettings()
    refuse_inside(out, [good] if good else [])
    if good:
        require_dir(Path(good), "folder of new good images", "pass the folder of the line's new good images (--good)")
    paths = list_images(Path(good)) if good else []
    if good and not paths:
        raise AnomatuneError(f"{good} holds no images (.png, .jpg, .bmp, .tif, ...): pass a folder of new good images")
    parent = Pipeline.load(source.path, **runtime.to_dict())
    store = FeedbackStore(source.path)
    lineage = getattr(parent, "lineage_", None)
    good_feedback, defects = _fresh_feedback(store, _store_verdicts(store, inspections), lineage) if feedback else ([], [])
    paths += [store.file(r["image"]) for r in good_feedback]
    paths = _unseen(paths, parent)
    if not paths:
        raise AnomatuneError(
            "no new good images: "
            + ("the images given were all learnt already; " if good or good_feedback else "")
            + f"pass --good DIR{' (the feedback holds no new good verdict)' if feedback else ' or --feedback'}"
        )
    images = AnomalyDataset([Record(p, 0, GOOD) for p in paths], False, name="new good images")
    test = _evaluation_split(parent, test_data) if evaluate else None
    metrics = {"parent": _main_metrics(parent.score(test))} if test is not None else None
    parent_id, parent_version = parent.model_id_, parent.version_
    updated = parent.update(images, settings)
    if test is not None:
        metrics["updated"] = _main_metrics(updated.score(test))
    updated.lineage_ = {
        "parent": parent_id,
        "parent_version": parent_version,
        "parent_run": str(source.path.resolve()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "added_images": [str(Path(p).resolve()) for p in paths],
        "n_train": updated.fit_record_.n_train,
        "feedback_good": [r["part"] for r in good_feedback],
        "feedback_defects": [r["part"] for r in defects],
        "update_seconds": updated.update_seconds_,
        "settings": settings.to_dict(),
        "metrics": metrics,
        "ancestors": lineage_chain(lineage),
    }
    extra = _defect_files(source.path, store, defects)
    version = updated.save(out, extra=extra, parent=parent_version if same_model else None, command="update", promote=promote)
    log.info("%s: version %s (%s) updated with %d image%s (parent %s)", out, version.path.name, updated.model_id_,
             len(paths), "" if len(paths) == 1 else "s", parent_id)  # fmt: skip
    return {"run": str(out), "version": version.path.name, "model": updated.model_id_, **updated.lineage_}


def threshold_version(run: str | Path, *, promote: bool = True, runtime: RuntimeSettings | None = None,
                      **rule: Any) -> dict[str, Any]:  # fmt: skip
    """Add to the model at ``run`` a version of its served one deciding by a new threshold ``rule`` (see
    :meth:`Pipeline.recalibrated`): the same tensors (stored once), a new threshold, calibration and id."""
    source = open_run(run)
    if not source.is_version:
        raise RunFolderError(f"{run} is not part of a model folder: pass the model's folder")
    parent = Pipeline.load(source.path, **(runtime or RuntimeSettings()).to_dict())
    new = parent.recalibrated(**rule)
    new.lineage_ = {
        "parent": parent.model_id_,
        "parent_version": parent.version_,
        "parent_run": str(source.path.resolve()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threshold": {"from": parent.threshold, "to": new.threshold, "rule": new.settings.threshold.to_dict()},
        "ancestors": lineage_chain(getattr(parent, "lineage_", None)),
    }
    version = new.save(source.model_path, parent=parent.version_, command="threshold", promote=promote)
    return {"version": version.path.name, "model": new.model_id_, "decision": new.image_calibration.describe(),
            **new.lineage_}  # fmt: skip


def _store_verdicts(files: FeedbackStore, settings: StoreSettings | None) -> list[dict]:
    """The last verdict on each part, from the inspections store (every station's, when it is shared), after the
    model's ``feedback.jsonl`` lines it does not hold yet were imported (once: by their ids)."""
    model = files.path.parent
    store = InspectionStore.chosen(settings, model)
    try:
        imported = store.import_feedback(files.records(), model=model.name)
        if imported:
            log.info("%d verdicts of %s imported into %s", imported, files.log_path, store.url)
        return store.verdicts(model.name)
    finally:
        store.close()


def _fresh_feedback(store: FeedbackStore, verdicts: list[dict], lineage: dict | None) -> tuple[list[dict], list[dict]]:
    """The parts whose last verdict no ancestor used yet: good ones and defects, each with its files on disk (a line
    whose image is missing is skipped, a missing mask dropped, each said in one warning)."""
    used, learnt = consumed_feedback(lineage), learnt_as_good(lineage)
    good, defects = [], []
    for record in verdicts:
        part = record.get("part") or record["id"]
        if part in used:
            if record["verdict"] == "defect" and part in learnt:
                log.warning("feedback %s is now a defect but an earlier version learnt it as good: refit to forget it", part)
            continue
        if not store.file(record["image"]).is_file():
            log.warning("feedback %s: its image %s is missing: skipped", record["id"], store.file(record["image"]))
            continue
        if record.get("mask") and not store.file(record["mask"]).is_file():
            log.warning("feedback %s: its mask %s is missing: kept without it", record["id"], store.file(record["mask"]))
            record = {**record, "mask": None}
        (good if record["verdict"] == "good" else defects).append({**record, "part": part})
    return good, defects


def _unseen(paths: list[Path], parent: Pipeline) -> list[Path]:
    """Each image once: not one the model was fitted on or updated with (same content, wherever it lies), never
    twice."""
    known = set((getattr(parent, "calibration_", None) or {}).get("files", []))
    lineage = getattr(parent, "lineage_", None)
    known.update(f for entry in lineage_chain(lineage) for f in entry.get("added_images", []))
    data = getattr(parent, "data_", None)
    if data is not None:
        from ..data.layouts import open_dataset

        try:
            known.update(str(r.path.resolve()) for r in open_dataset(data, "train").records)
        except AnomatuneError:  # the training folder moved: its images are known by the lists above only
            pass
    seen = {file_digest(Path(f)) for f in known if Path(f).is_file()}
    kept = []
    for path in paths:
        key = file_digest(path)
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if len(kept) < len(paths):
        log.info("%d of the images given were learnt already or given twice: each is learnt once", len(paths) - len(kept))
    return kept


def _evaluation_split(pipeline: Pipeline, data: DataSettings | None) -> AnomalyDataset:
    """Labelled images both versions are scored on: ``data``'s test split, else the run's own, when it has defects."""
    from ..data.layouts import open_dataset

    if data is None:
        data = getattr(pipeline, "data_", None)
        if data is None:
            raise AnomatuneError("the run does not say which data it was fitted on: pass --good-test and --defect")
    test = open_dataset(data, "test")
    if not any(test.labels):
        raise AnomatuneError(
            f"{test.name} holds no defect images: nothing to compare the versions on; pass labelled data "
            "(--good-test DIR --defect DIR [--masks DIR])"
        )
    return test


def _main_metrics(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in MAIN_METRICS}


def _defect_files(run: Path, store: FeedbackStore, defects: list[dict]) -> dict[str, Path]:
    """The run's ``defects/`` folder after the update: the parent's files and the new confirmed defects
    (masks only when every defect has one: the validation's real defects are all masked or none)."""
    files = {f"{DEFECTS}/{p.name}": p for p in sorted((run / DEFECTS).glob("*")) if p.is_file()}
    masked = all(r.get("mask") for r in defects) and all(
        (run / DEFECTS / f"{Path(n).stem}_mask.png").is_file() for n in files if not n.endswith("_mask.png")
    )
    for record in defects:
        image = store.file(record["image"])
        files[f"{DEFECTS}/{image.name}"] = image
        if masked:
            files[f"{DEFECTS}/{image.stem}_mask.png"] = store.file(record["mask"])
    if not masked:
        files = {n: p for n, p in files.items() if not n.endswith("_mask.png")}
    return files
