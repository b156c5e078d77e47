"""Browser tests: Playwright driving Debian's chromium (installed by .ci/run) against the real viewer."""

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture(scope="module")
def server(viewer_run):
    import uvicorn

    from nanosae.viewer import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(viewer_run, preload=True), host="127.0.0.1", port=port, log_level="warning")
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
    assert "precision 0.80, recall 0.70" in page.inner_text("#feature-nav + p")
    score = page.inner_text("#score")  # the score with its interval and the windows it rests on
    assert "n2g detection score 0.90 [0.85, 0.95] on 120 active + 300 silent held-out windows" in score
    assert "token F1 0.75" in score
    methods = page.locator("#explanations tr.method-row")  # every method's explanation, side by side
    assert methods.count() == 2 and methods.first.get_attribute("data-method") == "n2g"
    assert "words in bold type" in methods.nth(1).inner_text() and "0.70 [0.64, 0.76]" in methods.nth(1).inner_text()
    assert page.evaluate("window.__xss") is None


def test_overview_search_and_feature_page(browser, server):
    page, errors = open_page(browser, server + "/")
    page.wait_for_selector("#features tr.row")
    assert page.locator("#features tr.row").count() == 24
    # dense latents (over 5% of tokens) come after the rest in any order, marked
    classes = page.eval_on_selector_all("#features tr.row", "rows => rows.map(r => r.classList.contains('dense'))")
    assert classes == sorted(classes) and any(classes) and not all(classes)
    assert all("dense" in t for t in page.locator("#features tr.dense td:nth-child(2)").all_inner_texts())
    page.fill("#search", "bold")
    page.wait_for_function("document.querySelectorAll('#features tr.row').length === 1")
    page.click("#features tr.row")
    check_feature_page(page)
    # the output section: the measured effect (the model run with the feature ablated), the logit lens labelled
    page.wait_for_selector("#effect-how", timeout=60_000)
    assert "positions in" in page.inner_text("#effect-how") and "logit lens below agrees on" in page.inner_text(
        "#effect-how"
    )
    assert page.locator("#measured-effect tr").count() == 20
    assert "not measured" in page.inner_text("#app")
    page.hover("#top-examples .tok.focus >> nth=0")
    page.goto(server + "/#/feature/5")  # a latent without an explanation says why
    page.wait_for_function("document.querySelector('#feature-title')?.textContent === 'feature 5'")
    assert "too few to explain" in page.inner_text("#explanation")
    page.goto(server + "/#/feature/4")  # explained on too little evidence: no number, and why
    page.wait_for_function("document.querySelector('#feature-title')?.textContent === 'feature 4'")
    assert "no score: too little held-out evidence, 0.55..0.95 on 6 active" in page.inner_text("#score")
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
    page.wait_for_selector("#run-output .tok[data-value]")
    assert page.locator("#run-output .tok").count() == 3
    # coloured by one feature: the picked one's value on every token, orange where it fires and nowhere else
    options = page.locator("#run-feature option")
    assert options.count() >= 1 and "coloured by feature " + options.first.get_attribute("value") in page.inner_text(
        "#run-colour"
    )
    last = options.nth(options.count() - 1).get_attribute("value")
    page.select_option("#run-feature", last)
    page.wait_for_function(f"document.querySelector('#run-colour').textContent.includes('feature {last}:')")
    spans = page.locator("#run-output .tok")
    for i in range(spans.count()):
        value = float(spans.nth(i).get_attribute("data-value"))
        background = spans.nth(i).evaluate("s => s.style.background")
        assert (value > 0) == bool(background), (value, background)
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
    assert [(e["kind"], e["rank"], e["focus"]) for e in unpacked["examples"]] == [
        (e["kind"], e["rank"], e["focus"]) for e in served["examples"]
    ]
    for got, want in zip(unpacked["examples"], served["examples"]):
        assert got["acts"] == pytest.approx(want["acts"], abs=1e-3)
    assert unpacked["histogram"]["counts"] == served["histogram"]["counts"]
    assert page.locator("a", has_text="run text").count() == 0  # live pages need a server
    page.goto((site / "index.html").as_uri() + "#/")
    page.wait_for_selector("#features tr.row")
    assert page.locator("#features tr.row").count() == 24
    # dense latents (over 5% of tokens) come after the rest in any order, marked
    classes = page.eval_on_selector_all("#features tr.row", "rows => rows.map(r => r.classList.contains('dense'))")
    assert classes == sorted(classes) and any(classes) and not all(classes)
    assert all("dense" in t for t in page.locator("#features tr.dense td:nth-child(2)").all_inner_texts())
    page.goto((site / "index.html").as_uri() + "#/run")  # the live pages say they need the server
    page.wait_for_selector("#needs-server")
    assert "nanosae view" in page.inner_text("#needs-server")
    assert errors == []
    page.close()


def test_feature_page_layout_and_navigation(browser, server):
    """At 1280×900 the top examples start in the first screen; the histogram has axis labels, quantile examples
    are headed by where they sit, co-firing latents show their explanations, previous / next / random move
    between features, and a dead latent says so."""
    page, errors = open_page(browser, server + "/#/feature/3")
    page.wait_for_selector("#top-examples .tok")
    assert page.locator("#top-examples").bounding_box()["y"] < 900
    assert page.locator("#histogram text.tick").count() >= 5
    quantiles = page.locator("#quantile-examples .example").count()
    assert quantiles > 0 and page.locator("#quantile-examples .interval").count() == quantiles
    assert "percentile 0" in page.inner_text("#quantile-examples .interval >> nth=0")
    assert page.locator("#cofiring .cofire-expl").count() >= 1
    page.click("#next")
    page.wait_for_function("document.querySelector('#feature-title').textContent === 'feature 4'")
    page.click("#prev")
    page.wait_for_function("document.querySelector('#feature-title').textContent === 'feature 3'")
    assert page.get_attribute("#random", "href").startswith("#/feature/")
    page.click("#steer-link")  # opens the playground with this feature's edit filled in
    page.wait_for_selector("#steer-edits")
    assert page.input_value("#steer-edits").startswith("3=+")
    page.goto(server + "/#/feature/7")
    page.wait_for_selector("#never-fired")
    assert "never fired" in page.inner_text("#never-fired") and page.locator("#top-examples").count() == 0
    assert errors == []
    page.close()


def test_overview_pages_and_searches_example_text(browser, server):
    page, errors = open_page(browser, server + "/")
    page.wait_for_selector("#features tr.row")
    assert page.locator("#features").bounding_box()["y"] < 900  # the list is in the first screen
    assert page.inner_text("#showing") == "showing 1–24 of 24 features"
    assert page.is_disabled("#page-next") and page.is_disabled("#page-prev")
    page.fill("#search", "<script>")  # text that appears only inside an example of feature 3
    page.wait_for_function("document.querySelector('#showing').textContent.includes('of 24 features)')")
    ids = [
        page.locator("#features tr.row").nth(i).get_attribute("data-id")
        for i in range(page.locator("#features tr.row").count())
    ]
    assert "3" in ids
    page.click("#features tr.row[data-id='3']")
    page.wait_for_selector("#top-examples .tok")
    assert page.evaluate("window.scrollY") == 0  # the feature page opens at its top
    assert errors == []
    page.close()


def test_run_text_side_panel_and_steering_controls(browser, server):
    page, errors = open_page(browser, server + "/#/run")
    page.fill("#run-input", "w5 w9 w12")
    page.click("#run-button")
    page.wait_for_selector("#run-output .tok")
    page.click("#run-output .tok >> nth=1")
    page.wait_for_selector("#run-panel .panel-feature, #run-panel p")
    assert "token" in page.inner_text("#run-panel")
    assert page.locator("#run-output .tok.selected").count() == 1
    page.goto(server + "/#/steer?feature=2&value=3")
    page.wait_for_selector("#steer-tokens")
    assert page.input_value("#steer-edits") == "2=+3"
    page.fill("#steer-tokens", "3")
    page.fill("#steer-temperature", "0")
    page.click("text=generate")
    page.wait_for_selector("#steer-steered")
    assert "<|" not in page.inner_text("#steer-steered")
    assert errors == []
    page.close()
