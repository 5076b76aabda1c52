"""``anomatune update``: a new version of a run from the old one and new good images, without a refit.

The new version is a run folder like any other (served, evaluated, updated again), plus
``lineage.json``: its parent's model id and folder, the good images and feedback added,
the settings, the time it took, the metrics of both versions on the run's test split
when asked, and the lineage of the parent (its ancestors). The operator's feedback
(``FeedbackStore``, beside the served run) joins as follows: the images marked good (false
alarms) become training images once; confirmed defects never do, they are copied into the
run's ``defects/`` folder, a validation set of real defects (``--validation-defects``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..data.datasets import GOOD, AnomalyDataset, Record, require_dir
from ..data.images import list_images
from ..errors import AnomatuneError
from ..folders.base import refuse_inside
from ..folders.feedback import FeedbackStore
from ..folders.kinds import RunFolder
from ..metrics import MAIN_METRICS
from ..models.settings import UpdateSettings
from .pipeline import Pipeline
from .settings import RuntimeSettings

log = logging.getLogger(__name__)

DEFECTS = "defects"  # in a run: the confirmed defects of its lineage (images, and masks when every one has one)


def consumed_feedback(lineage: dict | None) -> set[str]:
    """The feedback ids a run's lineage has already used (training images or defects)."""
    used: set[str] = set()
    for entry in [lineage or {}, *((lineage or {}).get("ancestors") or [])]:
        used.update(entry.get("feedback_good", []))
        used.update(entry.get("feedback_defects", []))
    return used


def update_run(
    run: str | Path,
    good: str | Path | None,
    out: str | Path,
    *,
    feedback: bool = False,
    evaluate: bool = False,
    settings: UpdateSettings | None = None,
    runtime: RuntimeSettings | None = None,
) -> dict[str, Any]:
    """Write ``out``: the run at ``run`` updated with the good images of ``good`` (and, with ``feedback``, the
    feedback marked good). ``out`` may be ``run`` itself (a new version in place, swapped in as one set).
    Returns the lineage written."""
    run, out = Path(run), Path(out)
    settings = settings or UpdateSettings()
    runtime = runtime or RuntimeSettings()
    parent = Pipeline.load(run, **runtime.to_dict())
    refuse_inside(out, [good] if good else [])
    store = FeedbackStore(run)
    used = consumed_feedback(getattr(parent, "lineage_", None))
    fresh = [r for r in store.records() if r["id"] not in used] if feedback else []
    good_feedback = [r for r in fresh if r["verdict"] == "good"]
    defects = [r for r in fresh if r["verdict"] == "defect"]
    if good:
        require_dir(Path(good), "folder of new good images", "pass the folder of the line's new good images (--good)")
    paths = list_images(Path(good)) if good else []
    paths += [store.file(r["image"]) for r in good_feedback]
    if not paths:
        raise AnomatuneError(
            f"no new good images: pass --good DIR{' (the feedback holds no new good verdict)' if feedback else ' or --feedback'}"
        )
    images = AnomalyDataset([Record(p, 0, GOOD) for p in paths], False, name="new good images")
    test = None
    metrics = None
    if evaluate:
        test = _test_split(parent)
        metrics = {"parent": _main_metrics(parent.score(test))}
    parent_id = parent.model_id_
    with RunFolder(out).claim():
        updated = parent.update(images, settings)
        if test is not None:
            metrics["updated"] = _main_metrics(updated.score(test))
        ancestors = []
        if getattr(parent, "lineage_", None):
            previous = dict(parent.lineage_)
            ancestors = [{k: v for k, v in previous.items() if k != "ancestors"}, *previous.get("ancestors", [])]
        updated.lineage_ = {
            "parent": parent_id,
            "parent_run": str(run.resolve()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "added_images": [str(Path(p).resolve()) for p in paths],
            "n_train": updated.fit_record_.n_train,
            "feedback_good": [r["id"] for r in good_feedback],
            "feedback_defects": [r["id"] for r in defects],
            "update_seconds": updated.update_seconds_,
            "settings": settings.to_dict(),
            "metrics": metrics,
            "ancestors": ancestors,
        }
        extra = _defect_files(run, store, defects)
        updated.save(out, extra=extra)
    log.info("%s: %s updated with %d images (parent %s)", out, updated.model_id_, len(paths), parent_id)
    return {"run": str(out), "model": updated.model_id_, **updated.lineage_}


def _test_split(pipeline: Pipeline) -> AnomalyDataset:
    from ..data.layouts import open_dataset

    data = getattr(pipeline, "data_", None)
    if data is None:
        raise AnomatuneError("the run does not say which data it was fitted on: evaluate the versions with 'anomatune evaluate'")
    return open_dataset(data, "test")


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
