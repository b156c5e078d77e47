"""The graph pages of a transcoder set: the API (list, read, pins and supernodes saved into the graph file,
feature summaries per layer, interventions) and the page in headless Chromium."""

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nanosae.viewer import create_app
from tests.viewer.test_browser import CHROMIUM, open_page


@pytest.fixture()
def graph_run(transcoder_set, tmp_path):
    run = tmp_path / "set"
    shutil.copytree(transcoder_set, run)
    return run


def feature_node(run, layer="1"):
    data = json.loads((run / "graphs" / "tiny.json").read_text())
    return next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder" and n["layer"] == layer)


def test_graph_api(graph_run):
    client = TestClient(create_app(graph_run), base_url="http://localhost")
    assert client.get("/api/graphs").json() == {"graphs": ["tiny"]}
    graph = client.get("/api/graph/tiny").json()
    assert graph["metadata"]["slug"] == "tiny" and graph["links"]
    assert client.get("/api/graph/nope").status_code == 404
    assert client.get("/api/graph/..%2Fetc").status_code == 404
    node = feature_node(graph_run)
    r = client.put(
        "/api/graph/tiny/qparams", json={"pinnedIds": [node["node_id"]], "supernodes": [["a group", node["node_id"]]]}
    )
    assert r.status_code == 200
    saved = json.loads((graph_run / "graphs" / "tiny.json").read_text())["qParams"]
    assert saved["pinnedIds"] == [node["node_id"]] and saved["supernodes"] == [["a group", node["node_id"]]]
    assert saved["linkType"] == "both"  # the rest of qParams kept
    bad = client.put("/api/graph/tiny/qparams", json={"pinnedIds": ["99_1_1"], "supernodes": []})
    assert bad.status_code == 422 and "99_1_1" in bad.json()["detail"]
    huge = client.put(
        "/api/graph/tiny/qparams", json={"pinnedIds": [], "supernodes": [["x" * 5_000_000, node["node_id"]]]}
    )
    assert huge.status_code == 422 and "1..200 characters" in huge.json()["detail"]
    assert json.loads((graph_run / "graphs" / "tiny.json").read_text())["qParams"] == saved  # nothing saved
    layer, latent = node["node_id"].split("_")[:2]
    page = client.get(f"/api/layer/{layer}/feature/{latent}").json()
    assert page["explanation"] == "planted explanation"
    assert client.get("/api/layer/0/feature/1").status_code == 404  # no features.db for layer 0
    assert client.get("/layer/1/api/overview").status_code == 200  # the layer's own viewer
    r = client.post(
        "/api/intervene",
        json={"slug": "tiny", "edits": [{"node_id": node["node_id"], "op": "=", "value": 30}], "max_new_tokens": 3},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"original", "edited", "activations_before", "downstream"} and body["original"]["top"]
    assert (
        client.post(
            "/api/intervene", json={"slug": "tiny", "edits": [{"node_id": "E_5_1", "op": "=", "value": 1}]}
        ).status_code
        == 422
    )
    assert client.get("/").status_code == 200 and "graph.js" in client.get("/").text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_graph_page_in_a_browser(graph_run):
    import socket
    import threading
    import time

    import uvicorn
    from playwright.sync_api import sync_playwright

    from tests.viewer.test_browser import ARGS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(graph_run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    node = feature_node(graph_run)["node_id"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page, errors = open_page(browser, f"http://127.0.0.1:{port}/")
            page.wait_for_selector("a[href*='slug=tiny']")
            page.click("a[href*='slug=tiny']")
            page.wait_for_selector("#graph-svg circle")
            assert page.locator("#graph-svg .edge").count() > 0
            assert page.locator("#graph-svg circle.embedding").count() == 6
            # the logits' row sits right above the last layer's (no empty row), and the layer axis stays in view
            # when a long graph scrolls sideways
            labels = "[...document.querySelectorAll('#layer-axis text')]"
            rows = page.evaluate(f"() => {labels}.map(t => [t.textContent, +t.getAttribute('y')])")
            ys = {label: y for label, y in rows}
            assert [label for label, _ in rows] == ["emb", "L0", "L1", "L2", "logits"]
            logit_y = page.evaluate("() => +document.querySelector('#graph-svg circle.logit').getAttribute('cy')")
            assert logit_y == ys["logits"] - 4 and ys["L2"] - ys["logits"] == ys["L1"] - ys["L2"]
            page.set_viewport_size({"width": 500, "height": 700})  # narrower than the graph: it scrolls
            page.evaluate("() => { const w = document.querySelector('.graph-wrap'); w.scrollLeft = w.scrollWidth; }")
            box = page.locator("#layer-axis").bounding_box()
            wrap = page.locator(".graph-wrap").bounding_box()
            assert page.evaluate("() => document.querySelector('.graph-wrap').scrollLeft") > 0
            assert abs(box["x"] - wrap["x"]) < 2  # still at the left edge of the scrolled view
            page.set_viewport_size({"width": 1280, "height": 720})
            page.fill("#shown-edges", "0")
            assert page.locator("#graph-svg .edge").count() == 0
            page.click(f"circle[data-node-id='{node}']")
            page.wait_for_selector("#feature-explanation")
            node_edges = [
                link
                for link in json.loads((graph_run / "graphs" / "tiny.json").read_text())["links"]
                if node in (link["source"], link["target"])
            ]
            assert page.locator("#graph-svg .edge.around").count() == len(node_edges) > 0
            assert page.inner_text("#feature-explanation") == "planted explanation"
            assert "/layer/1/#/feature/" in page.get_attribute("#feature-link", "href")
            page.click("#pin")
            page.wait_for_selector(f"circle.pinned[data-node-id='{node}']")
            page.wait_for_selector("#pin:has-text('unpin')")  # the pin is saved and its list redrawn (a new name box)
            page.fill("#supernode-name", "my group")
            page.click("#group")
            page.wait_for_selector("#supernodes li")
            page.reload()
            page.wait_for_selector(f"circle.pinned[data-node-id='{node}']")  # pinning survives a reload
            assert "my group" in page.inner_text("#supernodes")
            page.click("#run-edits")
            page.wait_for_selector("#intervention .cols")
            assert "original" in page.inner_text("#intervention") and "edited" in page.inner_text("#intervention")
            assert errors == []
            browser.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=5)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_static_export_of_the_graphs(graph_run, tmp_path):
    """`view --export` on a transcoder set: the graph page from file://, feature explanations of its nodes,
    pins kept in the browser."""
    from playwright.sync_api import sync_playwright

    from nanosae.viewer import export_static
    from tests.viewer.test_browser import ARGS

    site = export_static(graph_run, tmp_path / "site")
    assert (site / "index.html").exists() and (site / "data" / "graphs.js").exists()
    node = feature_node(graph_run)["node_id"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page, errors = open_page(browser, (site / "index.html").as_uri())
        page.click("a[href*='slug=tiny']")
        page.wait_for_selector("#graph-svg circle")
        page.click(f"circle[data-node-id='{node}']")
        page.wait_for_selector("#feature-explanation")
        assert page.inner_text("#feature-explanation") == "planted explanation"
        page.click("#pin")
        page.wait_for_selector(f"circle.pinned[data-node-id='{node}']")
        page.reload()
        page.wait_for_selector(f"circle.pinned[data-node-id='{node}']")
        assert errors == []
        browser.close()
    assert export_static(graph_run, site) == site  # an earlier export is replaced
