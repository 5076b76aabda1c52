"""The operator page in headless Chromium: upload a good and a defective image, see both decisions and overlays,
overrule one, take it back and give it again (feedback stored in the model's folder) and see the drift line."""

import shutil
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from anomatune import Pipeline
from anomatune.folders.feedback import FeedbackStore
from anomatune.store import InspectionStore
from anomatune.store.inspections import DATABASE

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) drives the page")


def test_the_page_inspects_uploads_in_chromium(server, fast_run, images):
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium when apt-get can): the page was not tested")
    expected = Pipeline.load(fast_run, device="cpu").predict(list(images.values()))
    uploaded = list(images.values())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model-line').textContent.includes('threshold')", timeout=30000)
            for _ in range(5):  # keyboard: Tab reaches the file picker
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "file":
                    break
            assert page.evaluate("document.activeElement.id") == "file"
            page.set_input_files("#file", [str(p) for p in images.values()])
            page.wait_for_function("document.querySelectorAll('#results li[data-decision]').length === 2", timeout=60000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)", timeout=30000
            )
            decisions = page.eval_on_selector_all(
                "#results li",
                "items => items.map(i => [i.querySelector('.name').textContent, "
                "i.dataset.decision, i.querySelector('img').naturalWidth, i.querySelector('.score').textContent])",
            )
            model_line = page.text_content("#model-line")
            before = len(FeedbackStore(fast_run).records())
            newest = page.locator("#results li").first  # the last image inspected comes first
            newest.locator(".note").fill("scratch is dust")
            newest.get_by_role("button", name=f"Good part (false alarm): {uploaded[-1].name}").click()  # the operator overrules
            page.wait_for_selector(".feedback[data-saved='good']", timeout=30000)
            once_saved = newest.evaluate(
                "li => [li.querySelector('.decision').textContent, "
                "[...li.querySelectorAll('button')].map(b => [b.dataset.verdict, b.disabled, b.hidden])]"
            )
            newest.get_by_role("button", name=f"Undo: {uploaded[-1].name}").click()  # taken back, then given again
            page.wait_for_function("!document.querySelector('#results li .feedback').dataset.saved", timeout=30000)
            undone = newest.evaluate("li => li.querySelector('.decision').textContent")
            newest.get_by_role("button", name=f"Good part (false alarm): {uploaded[-1].name}").click()
            page.wait_for_selector(".feedback[data-saved='good']", timeout=30000)
            oldest = page.locator("#results li").nth(1)  # the operator paints where the defect is, then says Defect
            box = oldest.locator("canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
            page.mouse.up()
            oldest.get_by_role("button", name=f"Defect: {uploaded[0].name}").click()
            page.wait_for_selector(".feedback[data-saved='defect']", timeout=30000)
            page.wait_for_function("document.getElementById('drift-line').textContent.includes('Last')", timeout=30000)
            drift_line = page.text_content("#drift-line")
            page.reload()  # the shift comes back from the inspections store
            page.wait_for_function("document.getElementById('history').children.length >= 2", timeout=30000)
            tally_text = page.text_content("#tally")
            history = page.eval_on_selector_all("#history li", "items => items.map(i => i.textContent)")
        finally:
            browser.close()
    shown = {name: (decision, width, text) for name, decision, width, text in decisions}
    assert "expected false-alarm rate" in model_line
    store = FeedbackStore(fast_run)
    records = store.records()
    assert once_saved[0] == "good (operator)" and once_saved[1] == [
        ["good", True, False],
        ["defect", True, False],
        ["none", False, False],
    ]  # saved: the buttons are off, the badge says the operator's verdict, Undo is offered
    assert undone == ("defective" if expected.labels[-1] else "good")
    assert len(records) == before + 4 and [r["verdict"] for r in records[-4:]] == ["good", "none", "good", "defect"]
    assert records[-4]["note"] == "scratch is dust" and records[-4]["file"] == uploaded[-1].name
    assert store.file(records[-2]["image"]).read_bytes() == uploaded[-1].read_bytes()
    assert store.file(records[-1]["image"]).read_bytes() == uploaded[0].read_bytes()
    mask = np.asarray(Image.open(store.file(records[-1]["mask"])))
    assert mask.shape == np.asarray(Image.open(uploaded[0])).shape[:2] and set(np.unique(mask)) == {0, 255}
    assert 0.01 < (mask > 0).mean() < 0.6  # the painted stroke, not the whole image
    assert "above the threshold" in drift_line
    midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    shift = InspectionStore(fast_run / DATABASE).tally(since=midnight)
    assert tally_text.startswith(f"{shift['inspected']} inspected") and shift["inspected"] >= 2
    assert uploaded[-1].name in history[0] and "(operator: good)" in history[0]
    assert uploaded[0].name in history[1] and "(operator: defect)" in history[1]
    for path, label in zip(images.values(), expected.labels):
        assert shown[path.name][0] == ("defective" if label else "good")
        assert shown[path.name][1] > 0  # the overlay loaded
        assert "calibrated" in shown[path.name][2] and "0.50 = threshold" in shown[path.name][2]
    assert all(url.startswith(server.url) for url in requests)  # nothing from elsewhere (no CDN)
