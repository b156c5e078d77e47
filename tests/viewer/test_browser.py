"""Browser tests: Playwright driving Debian's chromium (installed by .ci/run) against the real viewer."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(viewer_run):
    import uvicorn

    from nanosae.viewer import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(viewer_run), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def check_feature_page(page):
    page.wait_for_selector("#top-examples .tok")
    assert page.inner_text("#feature-title") == "feature 3"
    spans = page.locator("#top-examples .tok")
    assert spans.count() > 4
    acts = [float(spans.nth(i).get_attribute("data-act")) for i in range(spans.count())]
    assert max(acts) > 0
    assert spans.first.get_attribute("title").startswith("activation")
    # hostile corpus text is shown as text, never run
    assert page.locator("#top-examples .tok", has_text="<script>").count() == 1
    assert page.locator("#top-examples img").count() == 0
    assert page.locator("#top-examples .tok.special", has_text="<|im_start|>").count() == 1  # a badge
    assert page.locator("#top-examples .tok", has_text="↵").count() >= 1  # a line break, visible, one line
    assert "<b onmouseover" in page.inner_text("#explanation")
    assert "precision 0.80, recall 0.70" in page.inner_text("#feature-title + p")
    assert page.evaluate("window.__xss") is None


def test_overview_search_and_feature_page(browser, server):
    page, errors = open_page(browser, server + "/")
    page.wait_for_selector("#features tr.row")
    assert page.locator("#features tr.row").count() == 24
    page.fill("#search", "bold")
    page.wait_for_function("document.querySelectorAll('#features tr.row').length === 1")
    page.click("#features tr.row")
    check_feature_page(page)
    page.hover("#top-examples .tok.focus >> nth=0")
    page.goto(server + "/#/feature/5")  # a latent without an explanation says why
    page.wait_for_function("document.querySelector('#feature-title')?.textContent === 'feature 5'")
    assert "too few to explain" in page.inner_text("#explanation")
    page.goto(server + "/#/feature/3")
    page.wait_for_selector("#top-examples .tok")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer_feature.png"), full_page=True)
    assert errors == []
    page.close()


def test_run_text_page(browser, server):
    page, errors = open_page(browser, server + "/#/run")
    page.fill("#run-input", "w5 w9 w12")
    page.click("#run-button")
    page.wait_for_selector("#run-output .tok")
    assert page.locator("#run-output .tok").count() == 3
    assert errors == []
    page.close()


def test_exported_site_opens_from_disk(browser, viewer_run, tmp_path):
    from nanosae.viewer import export_static

    site = export_static(viewer_run, tmp_path / "site")
    page, errors = open_page(browser, (site / "index.html").as_uri() + "#/feature/3")
    check_feature_page(page)
    # the packed data unpacks to what the server answers (floats to the 4 digits the pages show)
    from nanosae.viewer.app import ViewerData

    served = ViewerData(viewer_run).feature(3)
    unpacked = page.evaluate('window.NANOSAE_DATA["feature/3"]')
    assert [e["tokens"] for e in unpacked["examples"]] == [e["tokens"] for e in served["examples"]]
    assert [(e["kind"], e["rank"], e["focus"]) for e in unpacked["examples"]] == \
        [(e["kind"], e["rank"], e["focus"]) for e in served["examples"]]
    for got, want in zip(unpacked["examples"], served["examples"]):
        assert got["acts"] == pytest.approx(want["acts"], abs=1e-3)
    assert unpacked["histogram"]["counts"] == served["histogram"]["counts"]
    assert page.locator("a", has_text="run text").count() == 0  # live pages need a server
    page.goto((site / "index.html").as_uri() + "#/")
    page.wait_for_selector("#features tr.row")
    assert page.locator("#features tr.row").count() == 24
    page.goto((site / "index.html").as_uri() + "#/run")  # the live pages say they need the server
    page.wait_for_selector("#needs-server")
    assert "nanosae view" in page.inner_text("#needs-server")
    assert errors == []
    page.close()
