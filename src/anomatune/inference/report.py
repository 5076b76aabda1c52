"""One self-contained HTML page per run: metrics, curves, lineage, fine-tuning diagnostics, heatmap gallery.

Every image is inlined (base64), so the page can be mailed or archived on its own. The
page counts its images that failed to load into ``data-broken-images`` on the body (the
report test reads it back from headless Chromium).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..errors import RunFolderError
from ..finetune.settings import FinetuneSettings
from ..folders.base import atomic_write, refuse_inside
from ..folders.kinds import EvaluationFolder, FinetuneFolder, RunFolder
from ..pipeline.pipeline import read_run_config

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; } figcaption { font-size: 0.85em; max-width: 520px; }
img { max-width: 100%; } .gallery img { width: 512px; } .note { color: #666; font-size: 0.9em; }
"""
CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.brokenImages = images.filter(i => !i.complete || i.naturalWidth === 0).length;
});
</script>"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>" if path.is_file() else ""


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _validation_note(record: dict) -> str:
    """What the validation decided: the kept step, or the fallback to the frozen backbone."""
    validation = record.get("validation")
    if not validation:
        return "<p class='note'>No validation: the last step's weights are used.</p>"
    frozen, kept = validation["frozen"], validation["kept"]
    scores = (
        f"validation score (mean image AUROC over the anomaly families) / AUPRO: frozen {frozen['score']:.4f} / "
        f"{frozen['aupro']:.4f}, kept {kept['score']:.4f} / {kept['aupro']:.4f}"
    )
    if record.get("fallback"):
        return (
            f"<p><b>Fallback: no checkpoint beat the frozen backbone on validation, so this run uses the frozen backbone.</b> "
            f"({scores})</p>"
        )
    return f"<p>Kept step {kept['step']}, the best on validation ({scores}).</p>"


def _finetune_section(weights: str | None) -> str:
    if not weights:
        return "<h2>Fine-tuning</h2><p class='note'>This run uses the frozen pretrained backbone.</p>"
    folder = FinetuneFolder(weights)
    if folder.kind != FinetuneFolder.KIND or not (folder / FinetuneFolder.DIAGNOSTICS).is_file():
        return f"<h2>Fine-tuning</h2><p class='note'>Backbone weights from <code>{html.escape(weights)}</code> (no fine-tuning diagnostics).</p>"
    diagnostics = folder.read_json(FinetuneFolder.DIAGNOSTICS)
    record = folder.read_yaml(FinetuneFolder.RECORD)
    keys = [
        "negative_visible_share",
        "kept_visible_share",
        "positive_weight_mean",
        "negative_weight_mean",
        "good_feature_norm",
        "good_feature_variance",
        "good_negative_distance",
    ]
    rows = [(k.replace("_", " "), diagnostics["start"][k], diagnostics["end"][k]) for k in keys]
    collapsed = (
        "<p><b>Warning: the good features collapsed during this fine-tuning.</b></p>" if diagnostics.get("collapsed") else ""
    )
    settings = FinetuneSettings.from_dict(record["settings"], source=str(folder / FinetuneFolder.RECORD))
    return (
        f"<h2>Fine-tuning</h2><p>{'Backbone' if settings.mode == 'backbone' else 'Feature adaptor'} fine-tuned in "
        f"<code>{html.escape(str(folder.path))}</code>: {record['steps_done']} steps guided by {html.escape(settings.guide.name)}.</p>"
        f"{collapsed}{_validation_note(record)}"
        + _table(rows, ("", "start", "end"))
        + _figure(
            folder / FinetuneFolder.WEIGHTS_FIGURE,
            "Gradient weights P(z=−|u+) and P(z=+|u−) at the start and end (the supplementary's Figure 2)",
        )
        + _figure(folder / FinetuneFolder.LOSS_FIGURE, "Loss terms and mean gradient weights per step")
    )


def _selection_section(run: RunFolder) -> str:
    """``--detector auto``: the candidates' validation table, the winner and why."""
    if not (run / RunFolder.SELECTION).is_file():
        return ""
    selection = run.read_json(RunFolder.SELECTION)
    families = selection["validation"]["families"]
    rows = [
        (
            c["candidate"] + (" (chosen)" if c["candidate"] == selection["winner"] else ""),
            c["score"],
            c["aupro"],
            *(c["families"][f]["image_auroc"] for f in families if f in c["families"]),
            c["seconds"],
        )
        for c in selection["candidates"]
    ]
    header = ("candidate", "validation score", "validation AUPRO", *families, "fit + score s")
    v = selection["validation"]
    return (
        "<h2>How the detector was chosen (--detector auto)</h2>"
        f"<p>Chose <b>{html.escape(selection['winner'])}</b>: {html.escape(selection['why'])}. Validation: "
        f"{v['held_out_good_images']} held-out good images, each also with one synthetic anomaly of every family; "
        f"candidates fitted on {v['fit_images']} good images; no test image read.</p>" + _table(rows, header)
    )


def _lineage_section(run: RunFolder) -> str:
    """``anomatune update``: this version, its parent and their ancestors, newest first, with what each added."""
    if not (run / RunFolder.LINEAGE).is_file():
        return ""
    lineage = run.read_json(RunFolder.LINEAGE)
    rows = []
    for entry in [lineage, *lineage.get("ancestors", [])]:
        metrics = entry.get("metrics") or {}
        before, after = metrics.get("parent") or {}, metrics.get("updated") or {}
        rows.append(
            (
                entry["parent"],
                entry["time"],
                len(entry["added_images"]),
                len(entry.get("feedback_good", [])),
                len(entry.get("feedback_defects", [])),
                entry["n_train"],
                before.get("image_auroc"),
                after.get("image_auroc"),
                entry["update_seconds"],
            )
        )
    header = (
        "updated from",
        "time",
        "images added",
        "of them feedback",
        "defects kept",
        "images in all",
        "parent image AUROC",
        "new image AUROC",
        "seconds",
    )
    return (
        "<h2>Lineage (anomatune update)</h2><p class='note'>Each row is one update, newest first: the version it started "
        "from and what it learnt; image AUROC on the test split when the update was run with --evaluate.</p>"
        + _table(rows, header)
    )


def build_report(run_dir, out=None) -> Path:
    """Write ``report.html`` (or ``out``, outside the run) for an evaluated run and return its path."""
    run = RunFolder(run_dir).require()
    if out is not None:
        refuse_inside(out, [run.path])  # without --out the page goes into the run, beside its own files
    evaluation = run.evaluation
    if evaluation.kind != "evaluation":
        raise RunFolderError(f"{run.path} is not evaluated: run 'anomatune evaluate {run.path}' first")
    metrics = evaluation.read_json(EvaluationFolder.METRICS)
    config = read_run_config(run)
    title = f"anomatune: {metrics['category']}, {metrics['detector']} on {metrics['backbone']}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Run folder <code>{html.escape(str(run.path.resolve()))}</code></p>",
        "<h2>Metrics</h2>",
        _table([(k.replace("_", " "), v) for k, v in metrics.items() if k != "run"], ("metric", "value")),
        "<p class='note'>The F1-optimal threshold is tuned on the test labels (optimistic); the learnt threshold comes from held-out good training images only.</p>",
        "<h2>Curves</h2>",
        _figure(evaluation / EvaluationFolder.ROC, "Image-level ROC"),
        _figure(evaluation / EvaluationFolder.PRO, "Per-region overlap (PRO) curve"),
        _selection_section(run),
        _lineage_section(run),
        _finetune_section(config.settings.features.backbone_weights),
    ]
    if (evaluation / EvaluationFolder.GALLERY_INDEX).is_file():
        gallery = evaluation.read_json(EvaluationFolder.GALLERY_INDEX)
        parts.append(
            f"<h2>Heatmaps</h2><p class='note'>Threshold {gallery['threshold']:.4g}. Left: the image (ground truth outlined in green); "
            "right: the anomaly map, red at and above the threshold. Worst false positives first, then worst false negatives.</p><div class='gallery'>"
        )
        parts += [
            _figure(
                evaluation / e["image"],
                f"{e['kind']}: {Path(e['path']).parent.name}/{Path(e['path']).name}, score {e['score']:.4g}",
            )
            for e in gallery["entries"]
        ]
        parts.append("</div>")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>{CHECK}</head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    if out is None:
        with run.lock():
            return run.write_text(RunFolder.REPORT, page)
    out = Path(out)
    if not out.parent.is_dir():
        raise RunFolderError(f"folder {out.parent} does not exist: create it or choose another --out")
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out
