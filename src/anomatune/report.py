"""One self-contained HTML page per run: metrics, curves, fine-tuning diagnostics, heatmap gallery.

Every image is inlined (base64), so the page can be mailed or archived on its own. The
page counts its images that failed to load into ``data-broken-images`` on the body (the
report test reads it back from headless Chromium).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from .errors import AnomatuneError
from .runs import _atomic_write

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
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _finetune_section(config: dict) -> str:
    weights = config.get("backbone_weights")
    if not weights:
        return "<h2>Fine-tuning</h2><p class='note'>This run uses the frozen pretrained backbone.</p>"
    folder = Path(weights) if Path(weights).is_dir() else Path(weights).parent
    if not (folder / "diagnostics.json").is_file():
        return f"<h2>Fine-tuning</h2><p class='note'>Backbone weights from <code>{html.escape(weights)}</code> (no fine-tuning diagnostics beside them).</p>"
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    settings = yaml.safe_load((folder / "finetune.yaml").read_text())
    keys = ["negative_visible_share", "kept_visible_share", "positive_weight_mean", "negative_weight_mean",
            "good_feature_norm", "good_feature_variance", "good_negative_distance"]
    rows = [(k.replace("_", " "), diagnostics["start"][k], diagnostics["end"][k]) for k in keys]
    collapsed = "<p><b>Warning: the good features collapsed during this fine-tuning.</b></p>" if diagnostics.get("collapsed") else ""
    return (f"<h2>Fine-tuning</h2><p>Backbone fine-tuned in <code>{html.escape(str(folder))}</code>: "
            f"{settings['steps_done']} steps guided by {html.escape(settings['settings']['model'])}.</p>{collapsed}"
            + _table(rows, ("", "start", "end"))
            + _figure(folder / "finetune_weights.png", "Gradient weights P(z=−|u+) and P(z=+|u−) at the start and end (the supplementary's Figure 2)")
            + _figure(folder / "finetune_loss.png", "Loss terms and mean gradient weights per step"))


def build_report(run_dir, out=None) -> Path:
    """Write ``report.html`` (or ``out``) for an evaluated run and return its path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise AnomatuneError(f"{run_dir} has no metrics.json: run 'anomatune evaluate {run_dir}' first")
    metrics = json.loads(metrics_path.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    title = f"anomatune: {metrics['category']}, {metrics['detector']} on {metrics['backbone']}"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>Run folder <code>{html.escape(str(run_dir.resolve()))}</code></p>",
             "<h2>Metrics</h2>", _table([(k.replace("_", " "), v) for k, v in metrics.items() if k != "run"], ("metric", "value")),
             "<p class='note'>The F1-optimal threshold is tuned on the test labels (optimistic); the learnt threshold comes from held-out good training images only.</p>",
             "<h2>Curves</h2>", _figure(run_dir / "roc.png", "Image-level ROC"), _figure(run_dir / "pro.png", "Per-region overlap (PRO) curve"),
             _finetune_section(config)]
    gallery_path = run_dir / "gallery.json"
    if gallery_path.is_file():
        gallery = json.loads(gallery_path.read_text())
        parts.append(f"<h2>Heatmaps</h2><p class='note'>Threshold {gallery['threshold']:.4g}. Left: the image (ground truth outlined in green); "
                     "right: the anomaly map, red at and above the threshold. Worst false positives first, then worst false negatives.</p><div class='gallery'>")
        parts += [_figure(run_dir / e["image"], f"{e['kind']}: {Path(e['path']).parent.name}/{Path(e['path']).name}, score {e['score']:.4g}")
                  for e in gallery["entries"]]
        parts.append("</div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>{CHECK}</head>"
            f"<body>{''.join(parts)}</body></html>")
    out = Path(out) if out else run_dir / "report.html"
    _atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out
