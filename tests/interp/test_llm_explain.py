"""LLM explanations against a fake OpenAI-compatible server on 127.0.0.1."""

import ast
import json
import random
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from nanosae.interp.llm_explain import (ExplainerError, HTTPExplainer, correlation, explain_and_score, explain_llm,
                                        parse_simulation)
from tests.interp.test_explain import synthetic


def fake_server(rule: str):
    """Explains every feature with `rule`; simulates with the true rule ('def fib') or at random."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/chat/completions" and body["messages"][0]["role"] == "user"
            prompt = body["messages"][0]["content"]
            if "predict how strongly" in prompt:
                tokens = [ast.literal_eval(line.split("\t", 1)[1]) for line in prompt.split("\n\n")[-1].splitlines()]
                rng = random.Random(len(prompt))
                if "fib after def" in prompt:
                    values = [10 if i and tokens[i - 1] == " def" and t == " fib" else 0 for i, t in enumerate(tokens)]
                else:
                    values = [rng.randrange(11) for _ in tokens]
                content = "\n".join(f"{i}\t{v}" for i, v in enumerate(values))
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
def test_simulation_scores_true_rule_high_random_low(rule, good):
    server = fake_server(rule)
    try:
        explainer = HTTPExplainer(f"http://127.0.0.1:{server.server_port}")
        explanation, score = explain_and_score(explainer, synthetic(12), max_act=6.0)
    finally:
        server.shutdown()
    assert explanation == rule
    assert (score > 0.9) if good else (score < 0.3)


def test_parse_and_correlation():
    assert parse_simulation("0\t3\n1: 7\nnoise\n5\t9", 3) == [3.0, 7.0, 0.0]
    assert correlation([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert correlation([1, 1], [0, 1]) == 0.0


def make_db(path):
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE latents (id INTEGER PRIMARY KEY, fires INTEGER, max_act REAL, explanation TEXT,
                         score REAL, method TEXT);
                         CREATE TABLE examples (latent INTEGER, kind TEXT, rank INTEGER, tokens TEXT, acts TEXT);""")
    con.execute("INSERT INTO latents VALUES (0, 10, 6.0, 'old', 0.5, 'n2g'), (1, 5, 6.0, NULL, NULL, NULL)")
    for latent in (0, 1):
        for rank, ex in enumerate(synthetic(6, seed=latent)):
            con.execute("INSERT INTO examples VALUES (?, 'top', ?, ?, ?)", (latent, rank, json.dumps(ex.tokens), json.dumps(ex.acts)))
    con.commit()
    con.close()


def test_explain_llm_writes_all_rows(tmp_path):
    make_db(tmp_path / "features.db")
    server = fake_server("the token fib after def")
    try:
        n = explain_llm(tmp_path, HTTPExplainer(f"http://127.0.0.1:{server.server_port}/v1"))
    finally:
        server.shutdown()
    rows = sqlite3.connect(tmp_path / "features.db").execute("SELECT explanation, score, method FROM latents").fetchall()
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

    text = LocalExplainer(tiny_model).complete("w5 w6", max_tokens=3)
    assert isinstance(text, str)
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    server = fake_server("the token fib after def")
    try:
        r = CliRunner().invoke(app, ["explain", str(run), "--method", "llm", "--max-features", "3",
                                     "--explainer-url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert r.exit_code == 0, r.output
    rows = sqlite3.connect(run / "features.db").execute("SELECT COUNT(*) FROM latents WHERE method = 'llm'").fetchone()
    assert rows[0] == 3
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
    monkeypatch.delenv("NANOSAE_EXPLAINER_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    HTTPExplainer("http://api.example.com/v1")  # without a key, plain http is the user's business
