"""The station's review page in a real browser (Playwright driving Debian's chromium against uvicorn): the queue
worked with the keyboard alone, the product picker, the filtered inspection list and the statistics. Oracle: the
history database, read directly, and hand counts of what was pressed.

Set ``ANOMALENS_SCREENSHOTS=DIR`` to keep the pages' screenshots (the docs' pictures come from there)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="serve is in the test extras: pip install -e '.[test]'")
pytest.importorskip("sqlalchemy", reason="the station is in the test extras")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")

from test_serve_browser import BROWSER_ARGS, CHROMIUM, ServerThread  # noqa: E402

from anomalens.drift import conformal_p_values, simple_jumper  # noqa: E402
from anomalens.station.history import History  # noqa: E402
from anomalens.station.inspect import Station  # noqa: E402
from anomalens.station.models import ModelStore  # noqa: E402
from anomalens.station.pool import DetectorPool  # noqa: E402
from anomalens.station.server import create_station_app  # noqa: E402
from anomalens.station.settings import InspectionSettings  # noqa: E402
from anomalens.station.store import ImageStore  # noqa: E402

from conftest import textured_image, tiny_detector  # noqa: E402

pytestmark = [
    pytest.mark.heavy,  # a real browser
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def station(tmp_path):
    """Two products; ``cap`` with 6 inspections (all in the audit sample), ``plate`` with 4 (none audited)."""
    store = ModelStore(tmp_path / "models")
    for seed, product in enumerate(("cap", "plate")):
        rng = np.random.default_rng(seed)
        detector = tiny_detector("patchcore").fit([textured_image(rng, 64, 96) for _ in range(9)])
        store.add(product, detector.save(tmp_path / f"saved-{product}"))
    station = Station(DetectorPool(store), History(f"sqlite:///{tmp_path / 'h.db'}"), ImageStore(tmp_path / "store"),
                      InspectionSettings(audit_rate=1.0), seed=0)  # fmt: skip
    for product, count in (("cap", 6), ("plate", 4)):
        station.settings.audit_rate = 1.0 if product == "cap" else 0.0
        for index in range(count):
            image = textured_image(np.random.default_rng(100 + index), 64, 96)
            if index % 2 == 0:
                image[20:40, 30:60] = 250  # a defect on every other part
            station.inspect(product, _png(image), f"{product}-{index}.png", "camera-1")
    yield station
    station.pool.close()


def _shoot(page, name: str) -> None:
    folder = os.environ.get("ANOMALENS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def _open(playwright, url: str):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return browser, page, errors


def test_review_queue_keyboard_only(station):
    history = station.history
    queued = [row["id"] for row in history.queue("cap", 0.05)]
    assert len(queued) == 6
    labels = {row["id"]: row["label"] for row in history.inspections(product="cap", limit=None)}
    opposite = {"normal": "anomalous", "anomalous": "normal"}
    with ServerThread(create_station_app(station)) as url, sync_api.sync_playwright() as playwright:
        browser, page, errors = _open(playwright, url)
        try:
            page.wait_for_selector("#viewer:not([hidden])")
            assert "(1 of 6)" in page.inner_text("#viewer-title")
            page.keyboard.press("Tab")  # the product picker
            page.keyboard.press("Tab")  # the reviewer's name
            page.keyboard.type("ana")
            page.keyboard.press("Tab")  # out of the field, onto the queue tab
            page.keyboard.press("Tab")  # and on to the viewer's first button: the keys act on the queue
            assert page.evaluate("document.activeElement.id") == "accept"
            _shoot(page, "station-queue")
            expected: dict[int, str] = {}
            for key in ("a", "o", "s", "g", "d"):  # accept, overrule, skip, good, defective
                current = queued[[position for position, ident in enumerate(queued)
                                  if ident not in expected][page_index(page)]]  # fmt: skip
                if key == "a":
                    expected[current] = labels[current]
                elif key == "o":
                    expected[current] = opposite[labels[current]]
                elif key == "g":
                    expected[current] = "normal"
                elif key == "d":
                    expected[current] = "anomalous"
                page.keyboard.press(key)
                if key == "s":
                    page.wait_for_function("document.querySelector('#viewer-title').textContent.includes('(2 of')")
                else:
                    page.wait_for_function(f"document.querySelector('#queue-status').textContent"
                                           f".includes('#{current} reviewed')")  # fmt: skip
            page.keyboard.press("ArrowLeft")  # back to the skipped one
            assert page.inner_text("#viewer-title").startswith(f"#{queued[2]} ")
            reviewed = {row["id"]: (row["review_verdict"], row["reviewer"])
                        for row in history.inspections(product="cap", reviewed=True, limit=None)}  # fmt: skip
            assert reviewed == {ident: (verdict, "ana") for ident, verdict in expected.items()}
            assert len(history.queue("cap", 0.05)) == 2  # the skipped one and one not reached
            assert not errors
        finally:
            browser.close()


def page_index(page) -> int:
    """The queue position the page shows (``(K of N)`` in the title), from zero."""
    title = page.inner_text("#viewer-title")
    return int(title.rsplit("(", 1)[1].split(" of ")[0]) - 1


def test_product_picker_filters_and_statistics(station):
    history = station.history
    for row in history.inspections(product="cap", limit=None):  # an inspector's verdicts: the truth
        history.review(row["id"], "anomalous" if row["image_name"].split("-")[1][0] in "024" else "normal", "bo")
    with ServerThread(create_station_app(station)) as url, sync_api.sync_playwright() as playwright:
        browser, page, errors = _open(playwright, url)
        try:
            page.wait_for_selector("#product option", state="attached")
            page.fill("#reviewer", "cy")
            assert page.locator("#product option").all_inner_texts() == ["cap (v1)", "plate (v1)"]
            page.click("#tab-stats")
            page.wait_for_function("document.querySelector('#false-alarms').textContent.length > 0")
            alarms = history.false_alarms("cap")
            text = page.inner_text("#false-alarms")
            assert f"{alarms.flagged} of {alarms.normal} reviewed" in text and "promised" in text
            bars = page.locator("#histogram rect").count()
            assert bars == 30 and page.locator("#histogram line").count() == 1
            page.wait_for_function("document.querySelector('#drift-status').textContent.length > 0")
            drift_text = page.inner_text("#drift-status")
            assert "δ = 0.01" in drift_text
            for number, (name, passing) in enumerate((("passing parts", True), ("all parts", False))):
                stream = history.stream_scores("cap", 1, passing=passing)  # its martingale by brute force
                martingale = simple_jumper(conformal_p_values([score for _, score in stream], seed=2 + number))
                shown = page.evaluate(f"Number({martingale[-1]!r}).toPrecision(4)")
                assert f"{name}: martingale {shown} after {len(stream)} parts" in drift_text or "ALARM" in drift_text
                if len(stream) >= 2:
                    points = page.get_attribute(f"#drift polyline[data-stream={'passing' if passing else 'all'}]",
                                                "data-points")  # fmt: skip
                    assert points == str(len(stream))
            _shoot(page, "station-statistics")
            page.select_option("#product", "plate")
            page.click("#tab-list")
            page.select_option("#filter-label", "anomalous")
            page.click("#filters button[type=submit]")
            flagged = history.inspections(product="plate", label="anomalous", limit=None)
            page.wait_for_function(f"document.querySelector('#list-caption').textContent"
                                   f".startsWith('{len(flagged)} inspection')")  # fmt: skip
            ids = [int(text) for text in page.locator("#list-body tr td:first-child").all_inner_texts()]
            assert ids == [row["id"] for row in flagged]
            if flagged:
                page.locator("#list-body tr").first.focus()
                page.keyboard.press("Enter")  # open it from the list with the keyboard
                page.wait_for_selector("#viewer:not([hidden])")
                page.wait_for_function("document.querySelector('#viewer-overlay').complete")
                assert page.evaluate("document.querySelector('#viewer-image').naturalWidth") == 96
                _shoot(page, "station-inspection")
                page.keyboard.press("Tab")  # off the row, so the keys act on the viewer
                page.keyboard.press("g")
                page.wait_for_function(f"document.querySelector('#queue-status').textContent"
                                       f".includes('#{flagged[0]['id']} reviewed normal')")  # fmt: skip
                assert (history.inspection(flagged[0]["id"])["review_verdict"], history.inspection(flagged[0]["id"])[
                    "reviewer"]) == ("normal", "cy")
            assert not errors
        finally:
            browser.close()
