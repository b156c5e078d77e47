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
    assert len(f["top_logits"]) == 10 and f["score"] == 0.9


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

    from nanosae.interp.features import open_db

    con = open_db(viewer_run / "features.db")
    with pytest.raises(sqlite3.OperationalError):
        con.execute("DELETE FROM latents")


def test_run_text_and_steer(client):
    r = client.post("/api/run_text", json={"text": "w5 w6 w7", "top_k": 3}).json()
    assert len(r["tokens"]) == 3 and all(len(t["features"]) <= 3 for t in r["tokens"])
    r = client.post("/api/steer", json={"prompt": "w5 w6", "edits": [{"latent": 2, "value": 0, "mode": "clamp"}],
                                        "max_new_tokens": 3})
    assert r.status_code == 200 and set(r.json()) == {"baseline", "steered"}
    r = client.post("/api/steer", json={"prompt": "w5", "edits": [{"latent": 999, "value": 1}]})
    assert r.status_code == 422 and "out of range" in r.json()["detail"]
