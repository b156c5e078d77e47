"""LLM explanations against a fake OpenAI-compatible server on 127.0.0.1."""

import json
import random
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from nanosae.interp.explain import Evidence
from nanosae.interp.llm_explain import ExplainerError, HTTPExplainer, explain_and_score, explain_llm
from tests.interp.test_explain import make_db as make_n2g_db
from tests.interp.test_explain import natural_text, synthetic


def fake_server(rule: str):
    """Explains every feature with `rule`; answers detection questions by the true rule ('def fib') when the
    explanation is that rule, at random otherwise."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/chat/completions" and body["messages"][0]["role"] == "user"
            prompt = body["messages"][0]["content"]
            if "Does this feature fire" in prompt:
                text = prompt.split("Text: ", 1)[1].rsplit("\n\nDoes this feature", 1)[0]
                if "fib after def" in prompt:
                    content = "Yes" if " def fib" in text else "No"
                else:
                    content = random.Random(text).choice(["Yes", "No"])
            else:
                content = rule
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("rule,good", [("the token fib after def", True), ("random words", False)])
def test_detection_scores_true_rule_high_random_low(rule, good):
    server = fake_server(rule)
    try:
        explainer = HTTPExplainer(f"http://127.0.0.1:{server.server_port}")
        evidence = Evidence(synthetic(12), natural_text(300), max_act=6.0, fires=60)
        explanation, found = explain_and_score(explainer, evidence)
    finally:
        server.shutdown()
    assert explanation == rule
    assert (found.score > 0.9) if good else (found.score < 0.75)


def make_db(path):
    make_n2g_db(path, fires=(60, 40), planted=(0, 1))


def test_explain_llm_writes_all_rows(tmp_path):
    make_db(tmp_path / "features.db")
    server = fake_server("the token fib after def")
    try:
        n = explain_llm(tmp_path, HTTPExplainer(f"http://127.0.0.1:{server.server_port}/v1"))
    finally:
        server.shutdown()
    rows = (
        sqlite3.connect(tmp_path / "features.db").execute("SELECT explanation, score, method FROM latents").fetchall()
    )
    assert n == 2 and all(r[2] == "llm" and r[1] > 0.9 for r in rows)


def test_unreachable_endpoint_leaves_db_untouched(tmp_path):
    make_db(tmp_path / "features.db")
    before = (tmp_path / "features.db").read_bytes()
    with pytest.raises(ExplainerError, match="unreachable"):
        explain_llm(tmp_path, HTTPExplainer("http://127.0.0.1:9", timeout=2))
    assert (tmp_path / "features.db").read_bytes() == before


def test_local_explainer_and_cli(viewer_run, tmp_path, tiny_model):
    import shutil

    from typer.testing import CliRunner

    from nanosae.cli import app
    from nanosae.interp.llm_explain import LocalExplainer

    local = LocalExplainer(tiny_model)
    assert isinstance(local.complete("w5 w6", max_tokens=3), str)
    said = local.says_yes(["w5 w6", "w7 w8 w9 w10"])
    assert len(said) == 2 and all(isinstance(a, bool) for a in said)
    # batched, right-padded prompts give each prompt's own last-token logits (padding comes after it)
    import torch

    ids = [tiny_model.tokenizer.encode_chat(p) for p in ("w5 w6", "w7 w8 w9 w10")]
    batch = torch.tensor([ids[0] + [0, 0], ids[1]])
    together = tiny_model.logits_at(batch, [2, 4], [3, 11])
    alone = torch.cat([tiny_model.logits_at(torch.tensor([i]), [len(i) - 1], [3, 11]) for i in ids])
    assert torch.allclose(together, alone, atol=1e-5)
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    server = fake_server("the token fib after def")
    try:
        r = CliRunner().invoke(
            app,
            [
                "explain",
                str(run),
                "--method",
                "llm",
                "--max-features",
                "3",
                "--explainer-url",
                f"http://127.0.0.1:{server.server_port}",
            ],
        )
    finally:
        server.shutdown()
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(run / "features.db")
    # the features chosen for interest: enough firings to score, not dense, most frequent first (at most 3)
    interesting = [
        i
        for (i,) in con.execute(
            "SELECT id FROM latents WHERE fires >= 20 AND density <= 0.05 ORDER BY fires DESC, id LIMIT 3"
        )
    ]
    explained = [i for (i,) in con.execute("SELECT latent FROM explanations WHERE method = 'llm' ORDER BY latent")]
    assert interesting and explained == sorted(set(interesting) | {3})  # latent 3's LLM row was planted
    # stored beside the explanations already there, which stay (the planted ones, kept as n2g's)
    assert con.execute("SELECT method, score FROM explanations WHERE latent = 3 AND method = 'n2g'").fetchone() == (
        "n2g",
        0.9,
    )
    r = CliRunner().invoke(app, ["explain", str(run), "--method", "llm", "--explainer-url", "http://127.0.0.1:9"])
    assert r.exit_code != 0 and "unreachable" in str(r.exception)


def redirecting_server(target: str, seen: list):
    """Answers every POST with a 302 to `target` and records the Authorization header it was sent."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_api_key_is_never_sent_in_clear_text_or_across_a_redirect(monkeypatch):
    monkeypatch.setenv("NANOSAE_EXPLAINER_KEY", "sk-secret")
    with pytest.raises(ExplainerError, match="clear text to api.example.com"):
        HTTPExplainer("http://api.example.com/v1")
    HTTPExplainer("https://api.example.com/v1")  # https: fine
    for local in ("http://localhost:8080", "http://127.0.0.1:8080", "http://[::1]:8080"):
        HTTPExplainer(local)  # a server on this machine: fine
    with pytest.raises(ExplainerError, match="not an http"):
        HTTPExplainer("file:///etc/passwd")
    seen_first, seen_second = [], []
    second = redirecting_server("http://127.0.0.1:9/never", seen_second)
    first = redirecting_server(f"http://127.0.0.1:{second.server_port}/v1/chat/completions", seen_first)
    try:
        with pytest.raises(ExplainerError, match="redirected"):
            HTTPExplainer(f"http://127.0.0.1:{first.server_port}/v1").complete("hi", 5)
    finally:
        first.shutdown()
        second.shutdown()
    assert seen_first == ["Bearer sk-secret"] and seen_second == []  # asked once, never followed
    with pytest.raises(ExplainerError, match="clear text to evil.localhost"):
        HTTPExplainer("http://evil.localhost:8080")  # only `localhost` itself is this machine
    monkeypatch.delenv("NANOSAE_EXPLAINER_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    HTTPExplainer("http://api.example.com/v1")  # without a key, plain http is the user's business


def test_the_key_never_goes_through_a_proxy_in_clear_text(monkeypatch):
    """With http_proxy set, a request to a local http endpoint goes straight to it: the proxy sees nothing."""
    monkeypatch.setenv("NANOSAE_EXPLAINER_KEY", "sk-secret")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    proxied = []
    proxy = redirecting_server("http://127.0.0.1:9/never", proxied)
    server = fake_server("a rule")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_port}")
    try:
        assert HTTPExplainer(f"http://127.0.0.1:{server.server_port}/v1").complete("hi", 5) == "a rule"
    finally:
        proxy.shutdown()
        server.shutdown()
    assert proxied == []


def test_methods_are_kept_apart_and_the_best_scored_is_shown(tmp_path):
    """An LLM pass after N2G keeps N2G's explanations (a table row per latent and method); the latents table
    shows the best stated score's; a worse LLM pass later changes neither N2G's row nor what is shown."""
    from nanosae.interp.explain import explain_n2g

    make_db(tmp_path / "features.db")
    explain_n2g(tmp_path)
    con = lambda: sqlite3.connect(tmp_path / "features.db")
    n2g = con().execute("SELECT explanation, score FROM explanations WHERE latent = 0 AND method = 'n2g'").fetchone()
    for rule in ("the token fib after def", "random words"):
        server = fake_server(rule)
        try:
            explain_llm(tmp_path, HTTPExplainer(f"http://127.0.0.1:{server.server_port}"))
        finally:
            server.shutdown()
    rows = dict(con().execute("SELECT method, score FROM explanations WHERE latent = 0").fetchall())
    # the last LLM pass (random words) replaced its own row: a low score, or none where the interval is too wide
    assert set(rows) == {"n2g", "llm"} and (rows["llm"] is None or rows["llm"] < 0.75)
    assert (
        con().execute("SELECT explanation, score FROM explanations WHERE latent = 0 AND method = 'n2g'").fetchone()
        == n2g
    )
    shown = con().execute("SELECT explanation, score, method FROM latents WHERE id = 0").fetchone()
    assert shown == (*n2g, "n2g") and n2g[1] == max(v for v in rows.values() if v is not None)


def test_the_explainer_sees_strong_and_quantile_examples_and_its_line_is_cleaned():
    from nanosae.interp.explain import Example
    from nanosae.interp.llm_explain import clean_line, shown_examples

    top = [Example(["a", f"t{i}"], [0.0, 9.0 - i]) for i in range(4)]
    quantiles = [Example(["b", f"q{i}"], [0.0, 2.0 + i]) for i in range(4)]
    shown = shown_examples(Evidence(top + quantiles, [], max_act=9.0, fires=50))
    assert shown[:3] == top[:3] and {e.tokens[1] for e in shown[3:]} == {"q3", "q2", "q1"}  # weakest q0 below 25%
    assert clean_line('"The word fib after def."<|im_end|>\nmore') == "The word fib after def"
    assert clean_line("<|im_start|>assistant\n</s>") == "assistant"


def test_your_own_explanations_are_scored_and_kept_as_user(tmp_path):
    """--method user: lines from a JSON file, scored on held-out text by the explainer, stored as method "user"
    beside N2G's; a malformed file is a one-line error naming it."""
    from typer.testing import CliRunner

    from nanosae.cli import app
    from nanosae.interp.explain import explain_n2g

    make_db(tmp_path / "features.db")
    explain_n2g(tmp_path)
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"0": "the token fib after def", "1": "random words"}))
    server = fake_server("unused: nothing is generated")
    try:
        r = CliRunner().invoke(
            app,
            [
                "explain",
                str(tmp_path),
                "--method",
                "user",
                "--explanations",
                str(mine),
                "--explainer-url",
                f"http://127.0.0.1:{server.server_port}",
            ],
        )
    finally:
        server.shutdown()
    assert r.exit_code == 0, r.output
    con = sqlite3.connect(tmp_path / "features.db")
    rows = dict(con.execute("SELECT latent, score FROM explanations WHERE method = 'user'").fetchall())
    assert rows[0] > 0.9 and (rows[1] is None or rows[1] < 0.75)
    assert con.execute("SELECT COUNT(*) FROM explanations WHERE method = 'n2g'").fetchone()[0] == 2
    mine.write_text(json.dumps({"zero": "x"}))
    r = CliRunner().invoke(
        app,
        [
            "explain",
            str(tmp_path),
            "--method",
            "user",
            "--explanations",
            str(mine),
            "--explainer-url",
            "http://127.0.0.1:9",
        ],
    )
    assert r.exit_code != 0 and "mine.json" in str(r.exception) and "LATENT" in str(r.exception)
