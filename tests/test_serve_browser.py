"""End to end in a real browser: Playwright drives Debian's chromium against a running server."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="serve is in the test extras: pip install -e '.[test]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from anomalens.engines.access import AccessSettings  # noqa: E402
from anomalens.engines.serve import ServerSettings, create_app  # noqa: E402

from conftest import tiny_detector  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# .ci/run installs Debian's chromium when it is missing, so in CI this never skips.
pytestmark = [
    pytest.mark.heavy,  # a real browser
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
]
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1 in a background thread, stopped on exit."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start within 30 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_page_end_to_end(mvtec_root, tmp_path):
    references = sorted(str(path) for path in (mvtec_root / "widget" / "train" / "good").glob("*.png"))
    tests = sorted(str(path) for path in (mvtec_root / "widget" / "test").rglob("*.png"))
    bogus = tmp_path / "not-an-image.png"
    bogus.write_text("hello")
    settings = ServerSettings(max_files=4)  # 6 test images + 1 bogus: the page must split them into requests
    with (
        ServerThread(create_app(tiny_detector("patchcore"), settings)) as url,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(accept_downloads=True)
            page.set_default_timeout(30_000)
            page_errors = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(url)
            sync_api.expect(page.locator("#detector")).to_contain_text("not fitted")
            page.set_input_files("#reference-input", references)
            sync_api.expect(page.locator("#reference-status")).to_contain_text("fitted on 4 reference image(s)")
            sync_api.expect(page.locator("#detector")).to_contain_text("leave-one-out")
            page.set_input_files("#test-input", [*tests, str(bogus)])
            cards = page.locator("#results .card")
            sync_api.expect(cards).to_have_count(len(tests))
            sync_api.expect(page.locator("#messages")).to_contain_text("Not scored: not-an-image.png")
            # test/good/000.png and test/scratch/000.png share a name: each card keeps its own original.
            originals = page.locator("#results .card img:not(.heatmap)")
            assert len(set(originals.evaluate_all("images => images.map(image => image.src)"))) == len(tests)
            assert len(set(cards.evaluate_all("items => items.map(item => item.dataset.id)"))) == len(tests)
            assert page.evaluate("state.results.every(result => result.map_png === undefined)")  # raw maps on demand
            heatmap = cards.first.locator("img.heatmap")
            assert heatmap.get_attribute("src").startswith("data:image/jpeg;base64,")
            assert heatmap.evaluate("image => image.naturalWidth") == 48
            scores = [float(text) for text in page.locator("#results .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)  # most anomalous first
            # Slider to the far left: everything anomalous; far right: nothing.
            slider = page.locator("#threshold")
            slider.focus()
            page.keyboard.press("Home")
            sync_api.expect(page.locator("#counts")).to_have_text(f"{len(tests)} of {len(tests)} flagged")
            page.keyboard.press("End")
            sync_api.expect(page.locator("#counts")).to_have_text(f"0 of {len(tests)} flagged")
            sync_api.expect(page.locator("#results .badge.anomalous")).to_have_count(0)
            # Keyboard: open the large view on the first card and close it with Escape.
            cards.first.focus()
            page.keyboard.press("Enter")
            sync_api.expect(page.locator("#viewer")).to_be_visible()
            with page.expect_download() as raw_download:
                page.click("#viewer-raw")
            raw = Image.open(raw_download.value.path())
            assert raw.mode.startswith("I") and raw.size == (48, 40)  # the 16-bit map, fetched when asked for
            page.keyboard.press("Escape")
            sync_api.expect(page.locator("#viewer")).to_be_hidden()
            with page.expect_download() as download_info:
                page.click("#download")
            csv_text = open(download_info.value.path()).read()
            lines = csv_text.strip().splitlines()
            assert lines[0] == "name,score,label,threshold" and len(lines) == len(tests) + 1
            assert all(line.split(",")[2] == "normal" for line in lines[1:])
            # A refit: every shown verdict becomes stale until re-scored.
            page.set_input_files("#reference-input", references[:3])
            sync_api.expect(page.locator("#reference-status")).to_contain_text("fitted on 3 reference image(s)")
            sync_api.expect(page.locator("#results .card.stale")).to_have_count(len(tests))
            sync_api.expect(page.locator("#counts")).to_contain_text(f"{len(tests)} stale")
            page.click("#rescore")
            sync_api.expect(page.locator("#results .card.stale")).to_have_count(0)
            sync_api.expect(cards).to_have_count(len(tests))
            assert not page_errors, page_errors
        finally:
            browser.close()


def test_page_asks_for_the_api_key():
    access = AccessSettings(api_key="page-test-key-0123456789")
    with ServerThread(create_app(tiny_detector("patchcore"), access=access)) as url, \
            sync_api.sync_playwright() as playwright:  # fmt: skip
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            assert page.url.endswith("/login")
            page.fill("#key", "wrong-key")
            page.click("button[type=submit]")
            sync_api.expect(page.locator("body")).to_contain_text("Wrong key")
            page.fill("#key", access.api_key)
            page.click("button[type=submit]")
            sync_api.expect(page.locator("#detector")).to_contain_text("not fitted")
        finally:
            browser.close()


def test_serve_command_starts_and_answers():
    """`anomalens serve` itself: start the real command, poll /healthz, stop it."""
    import os
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "anomalens.cli", "serve", "--method", "patchcore", "--backbone", "taef2",
               "--pretrained", "none", "--set", "image_size=32", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ}, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    health = response.read().decode()
                break
            except OSError as error:
                if time.time() > deadline or process.poll() is not None:
                    output = process.stdout.read() if process.poll() is not None else ""
                    raise AssertionError(f"server did not answer: {output}") from error
                time.sleep(0.5)
        assert '"status":"ok"' in health and '"fitted":false' in health
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/detector", timeout=5) as response:
            assert '"method":"patchcore"' in response.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
