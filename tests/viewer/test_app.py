import pytest
from fastapi.testclient import TestClient

from nanosae.viewer import create_app


@pytest.fixture(scope="module")
def client(viewer_run):
    return TestClient(create_app(viewer_run), base_url="http://localhost")


def test_overview(client):
    r = client.get("/api/overview").json()
    assert r["meta"]["d_sae"] == 24 and r["metrics"]["fvu"] == 0.1
    assert "feature_density" not in r["metrics"]  # big arrays stay out of the overview
    assert sum(r["density_hist"]["counts"]) + r["density_hist"]["never_fired"] == 24


def test_feature_list_search_and_sort(client):
    r = client.get("/api/features", params={"sort": "density", "limit": 100}).json()
    dens = [f["density"] for f in r["items"]]
    assert r["total"] == 24 and dens == sorted(dens, reverse=True)
    r = client.get("/api/features", params={"q": "bold"}).json()
    assert [f["id"] for f in r["items"]] == [3]
    r = client.get("/api/features", params={"q": "7"}).json()
    assert [f["id"] for f in r["items"]] == [7]


def test_feature_page_data(client):
    f = client.get("/api/feature/3").json()
    assert f["id"] == 3 and f["examples"] and {"tokens", "acts", "focus"} <= set(f["examples"][0])
    assert len(f["top_logits"]) == 10 and (f["score"], f["precision"], f["recall"]) == (0.9, 0.8, 0.7)
    quiet = client.get("/api/feature/5").json()
    assert quiet["explanation"] is None and "too few to explain" in quiet["note"]


def test_bad_requests_are_clean_errors(client):
    r = client.get("/api/feature/999")
    assert r.status_code == 404 and "0..23" in r.json()["detail"]
    assert client.get("/api/feature/-1").status_code == 404
    assert client.get("/api/feature/abc").status_code == 422
    assert client.get("/api/features", params={"sort": "id; DROP TABLE latents"}).status_code == 422
    assert client.get("/api/features", params={"limit": 0}).status_code == 422


def test_no_path_outside_static(client):
    assert "nanosae viewer" in client.get("/").text and "textContent" in client.get("/app.js").text
    for path in ("/../app.py", "/%2e%2e/app.py", "/..%2fapp.py", "/../../interp/features.py", "/static/../app.py"):
        r = client.get(path)
        assert r.status_code == 404 or "create_app" not in r.text


def test_database_is_read_only(viewer_run):
    import sqlite3

    from nanosae.interp.featuredb import open_db

    con = open_db(viewer_run / "features.db")
    with pytest.raises(sqlite3.OperationalError):
        con.execute("DELETE FROM latents")


def test_run_text_and_steer(client):
    r = client.post("/api/run_text", json={"text": "w5 w6 w7", "top_k": 3}).json()
    assert len(r["tokens"]) == 3 and all(len(t["features"]) <= 3 for t in r["tokens"])
    r = client.post(
        "/api/steer",
        json={"prompt": "w5 w6", "edits": [{"latent": 2, "value": 0, "mode": "clamp"}], "max_new_tokens": 3},
    )
    assert r.status_code == 200 and set(r.json()) == {"baseline", "steered"}
    r = client.post("/api/steer", json={"prompt": "w5", "edits": [{"latent": 999, "value": 1}]})
    assert r.status_code == 422 and "out of range" in r.json()["detail"]


def test_run_text_leaves_dense_latents_out_and_gives_one_features_values(client, viewer_run, tiny_model):
    """The strongest features of each token are those of the SAE's own encoding with the dense latents (over 5%
    of tokens in features.db) left out, all of them with include_dense; `feature` gives its value everywhere."""
    import sqlite3

    import torch

    from nanosae import SAE
    from nanosae.config import DENSE_THRESHOLD

    sae = SAE.load(viewer_run / "sae")
    dense = {
        i
        for i, d in sqlite3.connect(viewer_run / "features.db").execute("SELECT id, density FROM latents")
        if d > DENSE_THRESHOLD
    }
    assert 0 < len(dense) < 24
    ids = tiny_model.prompt_ids("w5 w6 w7 w8")
    _, cache = tiny_model.run_with_cache(torch.tensor([ids]), [sae.cfg.hook_name], return_logits=False)
    z = sae.encode(cache[sae.cfg.hook_name])[0][1:].detach()
    feature = int(z.sum(0).argmax())
    r = client.post("/api/run_text", json={"text": "w5 w6 w7 w8", "top_k": 3, "feature": feature}).json()
    both = client.post("/api/run_text", json={"text": "w5 w6 w7 w8", "top_k": 3, "include_dense": True}).json()
    for n, (t, t_all) in enumerate(zip(r["tokens"], both["tokens"])):
        assert t["value"] == pytest.approx(float(z[n, feature]), abs=1e-4)
        assert not {i for i, _ in t["features"]} & dense
        kept = z[n].clone()
        kept[sorted(dense)] = 0
        assert {i for i, _ in t["features"]} == {int(i) for i in kept.topk(3).indices if kept[i] > 0}
        assert {i for i, _ in t_all["features"]} == {int(i) for i in z[n].topk(3).indices if z[n, i] > 0}
    assert client.post("/api/run_text", json={"text": "w5", "feature": 24}).status_code == 422


def test_only_local_host_names_are_answered(viewer_run):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: the viewer answers only this machine's names
    and the bound address, unless it is bound to every interface."""
    app = create_app(viewer_run, host="127.0.0.1")
    for base in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=base).get("/api/overview").status_code == 200, base
    for base in ("http://evil.example:8000", "http://127.0.0.1.evil.example", "http://testserver"):
        assert TestClient(app, base_url=base).get("/api/overview").status_code == 400, base
    lan = create_app(viewer_run, host="192.168.1.5")
    assert TestClient(lan, base_url="http://192.168.1.5:8000").get("/api/overview").status_code == 200
    anywhere = create_app(viewer_run, host="0.0.0.0")
    assert TestClient(anywhere, base_url="http://my-box.lan").get("/api/overview").status_code == 200


def test_hostile_query_values_are_answered_not_crashed(client):
    for params in ({"offset": 10**23}, {"q": "²"}, {"q": "٣"}, {"q": "9" * 40}, {"q": "12"}):
        r = client.get("/api/features", params=params)
        assert r.status_code in (200, 422), (params, r.status_code)
    assert client.get("/api/features", params={"q": "9" * 40}).json()["items"] == []
    r = client.post("/api/run_text", content='{"text": "w5 \\ud800 w6"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "text" in r.json()["detail"]
    bad_edits = [
        {"latent": 1.5, "value": 1},
        {"latent": 2, "value": float("nan")},
        {"latent": 2, "value": 1e308},
        {"latent": True, "value": 1},
        {"latent": 2, "value": "3"},
        {"latent": 2, "value": 1, "mode": "drop"},
        {"value": 1},
        "2=+3",
    ]
    for edit in bad_edits:
        body = '{"prompt": "w5", "edits": [' + __import__("json").dumps(edit) + "]}"
        r = client.post("/api/steer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (edit, r.status_code, r.text)
    r = client.post(
        "/api/steer",
        content='{"prompt": "w5", "edits": [{"latent": 2, "value": Infinity}]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and "finite" in r.json()["detail"]


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_never_replaces_what_it_did_not_write(viewer_run, tmp_path):
    from nanosae.errors import ConfigError
    from nanosae.viewer import export_static

    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    (victim / "precious" / "thesis.txt").write_text("years of work")
    with pytest.raises(ConfigError, match="did not write"):
        export_static(viewer_run, victim)
    assert (victim / "precious" / "thesis.txt").read_text() == "years of work"
    run_before = tree(viewer_run)
    with pytest.raises(ConfigError, match="did not write"):
        export_static(viewer_run, viewer_run)  # the run itself
    assert tree(viewer_run) == run_before
    site = tmp_path / "site"
    export_static(viewer_run, site)
    first = tree(site)
    assert "index.html" in first and "data/features-0.js" in first
    assert len(first) <= 20  # feature pages packed into a few files, not one per latent
    export_static(viewer_run, site)  # an earlier export is replaced
    assert tree(site) == first
    (site / "notes.md").write_text("mine")  # once a person adds a file, the directory is theirs
    with pytest.raises(ConfigError, match="notes.md"):
        export_static(viewer_run, site)
    assert (site / "notes.md").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or lock files left
