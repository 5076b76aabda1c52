"""The HTML report: one self-contained page that loads every image in headless Chromium."""

import re
import shutil
import subprocess

import pytest

from anomatune import build_report, evaluate
from tests.conftest import served


def test_report_is_one_page_that_loads_every_image_in_chromium(fast_run, tmp_path):
    run = shutil.copytree(fast_run, tmp_path / "run")
    evaluate(run, device="cpu")
    page = build_report(run, tmp_path / "report.html")
    text = page.read_text()
    assert "<h2>Metrics</h2>" in text and ("false positive" in text or "highest score" in text)
    assert 'src="gallery' not in text and text.count("data:image/png;base64,") >= 3  # self-contained
    assert build_report(run) == served(run) / "report.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "chromium is not installed (make test installs Debian's chromium when apt-get can): the page was not rendered"
        )
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "chromium returned no page"
    images = int(re.search(r'data-images="(\d+)"', body.group(1)).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', body.group(1)).group(1))
    assert images == text.count("<img") and images >= 3 and broken == 0


def test_the_what_if_threshold_moves_the_counts_in_chromium(fast_run, tmp_path):
    import json

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) drives the page")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium when apt-get can): the page was not tested")
    run = shutil.copytree(fast_run, tmp_path / "run")
    evaluate(run, device="cpu", figures=False)
    images = json.loads((served(run) / "evaluation" / "images.json").read_text())
    good = [r["score"] for r in images["images"] if r["label"] == 0]
    bad = [r["score"] for r in images["images"] if r["label"] == 1]
    threshold = images["threshold"]
    page_path = build_report(run)
    assert "Decisions" in page_path.read_text() and "What-if threshold" in page_path.read_text()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(page_path.as_uri())
            counts = lambda: (
                int(page.get_attribute("body", "data-false-alarms")),
                int(page.get_attribute("body", "data-misses")),
            )  # noqa: E731
            assert counts() == (sum(s > threshold for s in good), sum(s <= threshold for s in bad))  # the run's threshold
            page.focus("#what-if")
            page.keyboard.press("End")  # the highest threshold: nothing flagged
            assert counts() == (0, len(bad)) and "0 of" in page.text_content("#what-if-line")
            page.keyboard.press("Home")  # the lowest: everything flagged
            assert counts() == (len(good), 0)
            assert page.get_attribute("#roc-point", "cx") == "210" and page.get_attribute("#roc-point", "cy") == "10"
        finally:
            browser.close()
