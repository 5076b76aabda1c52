"""One self-contained HTML page per run: decisions, metrics, curves, lineage, fine-tuning diagnostics, heatmap gallery.

Every image is inlined (base64), so the page can be mailed or archived on its own. The
page counts its images that failed to load into ``data-broken-images`` on the body (the
report test reads it back from headless Chromium). The decisions section carries the test
images' scores as JSON and draws, in the page itself (no server), the histogram of good and
defective scores and the ROC curve with the threshold on both, and a what-if threshold
slider that updates the false alarms and misses.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..errors import RunFolderError
from ..finetune.settings import FinetuneSettings
from ..folders.base import atomic_write, refuse_inside
from ..folders.kinds import EvaluationFolder, FinetuneFolder, RunFolder, open_run
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


DECISIONS_SCRIPT = """<script>
(() => {
  const data = JSON.parse(document.getElementById("decision-data").textContent);
  const rows = data.images, cal = data.calibration, slider = document.getElementById("what-if");
  const good = rows.filter(r => r.label === 0).map(r => r.score), bad = rows.filter(r => r.label === 1).map(r => r.score);
  const lo = Math.min(...rows.map(r => r.score)), hi = Math.max(...rows.map(r => r.score));
  const pad = (hi - lo) * 0.02 || 1;
  slider.min = lo - pad; slider.max = hi + pad; slider.step = (hi - lo + 2 * pad) / 1000;
  slider.value = data.threshold ?? (lo + hi) / 2;
  function rate(s) {  // the run's calibrated false-alarm rate (anomatune.calibration)
    if (!cal) return null;
    if (s >= cal.tail_start) {
      const z = Math.max(s - cal.tail_start, 0) / cal.tail_scale;
      return cal.tail_rate * (cal.tail_shape === 0 ? Math.exp(-z) : Math.pow(1 + cal.tail_shape * z, -1 / cal.tail_shape));
    }
    const xs = cal.body_scores, ys = cal.body_rates;
    if (s <= xs[0]) return ys[0];
    let i = 1; while (i < xs.length - 1 && xs[i] < s) i++;
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (s - xs[i - 1]) / ((xs[i] - xs[i - 1]) || 1);
  }
  const W = 480, H = 200, svg = (id) => document.getElementById(id);
  const x = s => 30 + (s - lo + pad) / (hi - lo + 2 * pad) * (W - 40);
  const bins = 30, width = (hi - lo + 2 * pad) / bins;
  const count = v => { const c = new Array(bins).fill(0); v.forEach(s => c[Math.min(bins - 1, Math.floor((s - lo + pad) / width))]++); return c; };
  const cg = count(good), cb = count(bad), top = Math.max(1, ...cg, ...cb);
  let bars = "";
  [[cg, "#2a9d4b"], [cb, "#d1495b"]].forEach(([c, colour]) => c.forEach((n, i) => {
    const h = n / top * (H - 30);
    if (n) bars += `<rect x="${x(lo - pad + i * width)}" y="${H - 20 - h}" width="${(W - 40) / bins - 1}" height="${h}" fill="${colour}" fill-opacity="0.55"/>`;
  }));
  svg("histogram").innerHTML = bars + `<line x1="30" y1="${H - 20}" x2="${W - 10}" y2="${H - 20}" stroke="#888"/>` +
    `<line id="hist-threshold" y1="5" y2="${H - 20}" stroke="#000" stroke-dasharray="4 3"/>`;
  const all = rows.map(r => r.score).sort((a, b) => b - a);
  let roc = "M 30 190";
  all.forEach(t => { const f = good.filter(s => s >= t).length / Math.max(1, good.length), p = bad.filter(s => s >= t).length / Math.max(1, bad.length);
    roc += ` L ${30 + f * 180} ${190 - p * 180}`; });
  svg("roc").innerHTML = `<rect x="30" y="10" width="180" height="180" fill="none" stroke="#888"/><path d="${roc} L 210 10" fill="none" stroke="#1f5fa8" stroke-width="2"/>` +
    `<circle id="roc-point" r="5" fill="#000"/><text x="80" y="205" font-size="11">false-alarm rate</text>`;
  function update() {
    const t = Number(slider.value);
    const alarms = good.filter(s => s > t).length, misses = bad.filter(s => s <= t).length;
    document.body.dataset.falseAlarms = alarms; document.body.dataset.misses = misses;
    const r = rate(t);
    document.getElementById("what-if-line").textContent =
      `Threshold ${t.toPrecision(4)}: ${alarms} of ${good.length} good images flagged (false alarms), ` +
      `${misses} of ${bad.length} defects missed` + (r === null ? "" : `; calibrated false-alarm rate ${(100 * r).toPrecision(3)} %`);
    const line = document.getElementById("hist-threshold"); line.setAttribute("x1", x(t)); line.setAttribute("x2", x(t));
    const dot = document.getElementById("roc-point");
    dot.setAttribute("cx", 30 + alarms / Math.max(1, good.length) * 180); dot.setAttribute("cy", 190 - (bad.length - misses) / Math.max(1, bad.length) * 180);
  }
  slider.addEventListener("input", update);
  update();
})();
</script>"""


def _decisions_section(evaluation: EvaluationFolder) -> str:
    """The decision at the run's threshold: counts, histogram, ROC point, a what-if slider and the per-image table."""
    if not (evaluation / EvaluationFolder.IMAGES).is_file():
        return ""
    data = evaluation.read_json(EvaluationFolder.IMAGES)
    rows = sorted(data["images"], key=lambda r: -r["score"])
    table = _table(
        [
            (
                f"{r['kind']}/{Path(r['path']).name}",
                "defective" if r["label"] else "good",
                r["score"],
                r["normalized_score"],
                r["false_alarm_rate"],
                r["decision"],
                "" if r["decision"] is None or (r["decision"] == "defective") == bool(r["label"]) else
                ("false alarm" if r["label"] == 0 else "missed"),
            )
            for r in rows
        ],
        ("image", "ground truth", "score", "calibrated (0.5 = threshold)", "false-alarm rate", "verdict", "error"),
    )  # fmt: skip
    payload = json.dumps(data).replace("</", "<\\/")
    calibration = data.get("calibration")
    expected = (
        f" The threshold was set for a false-alarm rate of {calibration['target_rate']:.2%} on the good training images "
        f"scored out of fold (expected {calibration['rate_at_threshold']:.2%}, 95 % interval "
        f"{calibration['interval'][0]:.1%}–{calibration['interval'][1]:.1%})."
        if calibration and calibration.get("target_rate")
        else ""
    )
    return (
        "<h2>Decisions</h2>"
        f"<p>Threshold {_fmt(data['threshold'])}, learnt from good training images only.{html.escape(expected)} "
        "Move the what-if threshold to see the false alarms and misses it would give on these test images.</p>"
        f"<script type='application/json' id='decision-data'>{payload}</script>"
        "<p><label for='what-if'>What-if threshold</label> <input type='range' id='what-if' style='width:480px'></p>"
        "<p id='what-if-line'></p>"
        "<figure><svg id='histogram' width='480' height='200'></svg><figcaption>Scores of good (green) and "
        "defective (red) test images; dashed: the threshold</figcaption></figure>"
        "<figure><svg id='roc' width='230' height='210'></svg><figcaption>ROC curve; the dot: the threshold</figcaption></figure>"
        f"<details><summary>Every test image ({len(rows)}), highest score first</summary>{table}</details>" + DECISIONS_SCRIPT
    )


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
    skipped = ", ".join(f"{s['candidate']} (about {s['estimated_seconds']:.0f} s)" for s in selection.get("skipped", ()))
    return (
        "<h2>How the detector was chosen (--detector auto)</h2>"
        f"<p>Chose <b>{html.escape(selection['winner'])}</b>: {html.escape(selection['why'])}. Validation: "
        f"{v['held_out_good_images']} held-out good images, each also with one synthetic anomaly of every family; "
        f"candidates fitted on {v['fit_images']} good images; no test image read.</p>"
        + (f"<p>Skipped to keep within --search-budget: {html.escape(skipped)}.</p>" if skipped else "")
        + _table(rows, header)
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
    run = open_run(run_dir)
    if out is not None:
        refuse_inside(out, [run.model_path])  # without --out the page goes into the run, beside its own files
    evaluation = run.evaluation
    if evaluation.kind != "evaluation":
        raise RunFolderError(f"{run.path} is not evaluated: run 'anomatune evaluate {run.path}' first")
    metrics = evaluation.read_json(EvaluationFolder.METRICS)
    config = read_run_config(run)
    title = f"anomatune: {metrics['category']}, {metrics['detector']} on {metrics['backbone']}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Run folder <code>{html.escape(str(run.path.resolve()))}</code></p>",
        _decisions_section(evaluation),
        "<h2>Metrics</h2>",
        _table([(k.replace("_", " "), v) for k, v in metrics.items() if k != "run"], ("metric", "value")),
        "<p class='note'>The F1-optimal threshold is tuned on the test labels (optimistic); the learnt threshold comes from the good training images only, each scored out of fold.</p>",
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
