import json
import random
import sqlite3

import pytest

from nanosae.interp.explain import Example, describe, explain_latent, explain_n2g, f1

WORDS = [f" w{i}" for i in range(30)]


def synthetic(n: int, seed: int = 0) -> list[Example]:
    """Windows of random words; the latent fires (strongly) exactly where ' def' is followed by ' fib'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = [rng.choice(WORDS) for _ in range(16)]
        for _ in range(2):
            p = rng.randrange(1, 16)
            tokens[p - 1], tokens[p] = " def", " fib"
        tokens[rng.randrange(16)] = " fib"  # ' fib' alone must not be enough
        acts = [0.0] * 16
        for p in range(1, 16):
            if tokens[p - 1] == " def" and tokens[p] == " fib":
                acts[p] = 5.0 + rng.random()
        for p in range(16):  # weak noise that stays under the 'strongly active' line
            acts[p] = acts[p] or (0.3 if rng.random() < 0.1 else 0.0)
        out.append(Example(tokens, acts))
    return out


def test_n2g_recovers_the_planted_pattern():
    examples = synthetic(30)
    patterns, score = explain_latent(examples, max_act=6.0)
    assert patterns[0] == (" def", " fib")
    assert score > 0.9
    assert describe(patterns).startswith('" def" " fib"')


def test_a_wrong_pattern_scores_low():
    examples = synthetic(30, seed=1)
    assert f1([(" fib",)], examples, 1.5)[2] < 0.8  # too broad: ' fib' without ' def'
    assert f1([(" w3", " w4")], examples, 1.5)[2] < 0.1
    assert f1([(" def", None, " fib")], examples, 1.5)[2] < 0.5


def test_explain_n2g_writes_features_db(tmp_path):
    db = tmp_path / "features.db"
    con = sqlite3.connect(db)
    con.executescript("""CREATE TABLE latents (id INTEGER PRIMARY KEY, fires INTEGER, max_act REAL, explanation TEXT,
                         score REAL, method TEXT);
                         CREATE TABLE examples (latent INTEGER, kind TEXT, rank INTEGER, tokens TEXT, acts TEXT);""")
    con.execute("INSERT INTO latents VALUES (0, 10, 6.0, NULL, NULL, NULL), (1, 0, 0, NULL, NULL, NULL)")
    for rank, ex in enumerate(synthetic(20)):
        con.execute("INSERT INTO examples VALUES (0, 'top', ?, ?, ?)", (rank, json.dumps(ex.tokens), json.dumps(ex.acts)))
    con.commit()
    con.close()
    assert explain_n2g(tmp_path) == 1
    row = sqlite3.connect(db).execute("SELECT explanation, score, method FROM latents WHERE id = 0").fetchone()
    assert row[0].startswith('" def" " fib"') and row[1] > 0.9 and row[2] == "n2g"


def test_missing_db(tmp_path):
    with pytest.raises(Exception, match="nanosae features"):
        explain_n2g(tmp_path)
