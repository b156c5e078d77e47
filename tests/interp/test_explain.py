import json
import random
import sqlite3

import pytest

from nanosae.interp.explain import (
    MIN_FIRES,
    Evidence,
    Example,
    describe,
    detection,
    explain_latent,
    explain_n2g,
    f1,
    found_in,
)

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


def silent_text(n: int, seed: int = 0) -> list[Example]:
    """Random windows where the latent does not fire: words, lone ' def' and lone ' fib', never the pair."""
    rng = random.Random(seed + 100)
    out = []
    for _ in range(n):
        tokens = [rng.choice(WORDS + [" fib", " def"]) for _ in range(16)]
        for p in range(1, 16):
            if tokens[p - 1] == " def" and tokens[p] == " fib":
                tokens[p] = " w1"
        out.append(Example(tokens, [0.0] * 16))
    return out


def test_n2g_recovers_the_planted_pattern():
    evidence = Evidence(synthetic(30), silent_text(40), max_act=6.0, fires=60)
    patterns, found = explain_latent(evidence)
    assert patterns[0] == (" def", " fib")
    assert found.score > 0.9 and found.precision > 0.9 and found.recall > 0.9
    assert describe(patterns).startswith('" def" " fib"')


def test_token_level_f1_of_wrong_patterns_is_low():
    examples = synthetic(30, seed=1)
    assert f1([(" fib",)], examples, 1.5)[2] < 0.8  # too broad: ' fib' without ' def'
    assert f1([(" w3", " w4")], examples, 1.5)[2] < 0.1
    assert f1([(" def", None, " fib")], examples, 1.5)[2] < 0.5


def code_windows(n: int, seed: int, fires_after_def: bool) -> list[Example]:
    """Tokenised code: words with ' ' as its own token. The planted latent fires on the space after 'def'."""
    rng = random.Random(seed)
    words = ["x", "=", "return", "if", "for", "in", "print", "(", ")"]
    out = []
    for _ in range(n):
        tokens = []
        while len(tokens) < 16:
            tokens += [rng.choice(words), " "]
        if fires_after_def:
            p = rng.randrange(0, 14, 2)
            tokens[p] = "def"
        tokens = tokens[:16]
        acts = [4.0 if i and tokens[i] == " " and tokens[i - 1] == "def" else 0.0 for i in range(16)]
        out.append(Example(tokens, acts))
    return out


def test_detection_scores_what_an_explanation_predicts_and_no_better():
    """Scored on windows where the latent is silent too: a single word that predicts a latent scores high; a
    space for a latent that fires only on the space after 'def' scores at chance, and the right pattern
    'def' ' ' beats it."""
    rng = random.Random(0)
    word_windows = []
    for i in range(40):
        tokens = [rng.choice(WORDS) for _ in range(16)]
        if i % 2 == 0:
            tokens[rng.randrange(16)] = " cat"
        word_windows.append(Example(tokens, [3.0 if t == " cat" else 0.0 for t in tokens]))
    cat = detection(lambda toks: found_in([(" cat",)], toks), word_windows, threshold=1.0)
    assert cat.score == 1.0 and cat.precision == 1.0 and cat.recall == 1.0

    windows = code_windows(30, 1, True) + code_windows(30, 2, False)
    space = detection(lambda toks: found_in([(" ",)], toks), windows, threshold=1.0)
    right = detection(lambda toks: found_in([("def", " ")], toks), windows, threshold=1.0)
    assert space.recall == 1.0 and space.score == pytest.approx(0.5)  # says "fires" everywhere: chance
    assert right.score == 1.0 > space.score
    # built from evidence with silent text in it, N2G finds the right pattern, not the space
    evidence = Evidence(code_windows(30, 3, True), code_windows(40, 4, False), max_act=4.0, fires=60)
    patterns, found = explain_latent(evidence)
    assert patterns[0] == ("def", " ") and found.score > 0.95


def make_db(path, fires=(60, 5)):
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE latents (id INTEGER PRIMARY KEY, fires INTEGER, max_act REAL, explanation TEXT,
                         score REAL, method TEXT);
                         CREATE TABLE examples (latent INTEGER, kind TEXT, rank INTEGER, tokens TEXT, acts TEXT);
                         CREATE TABLE windows (id INTEGER PRIMARY KEY, tokens TEXT, latents TEXT);""")
    con.executemany("INSERT INTO latents VALUES (?, ?, 6.0, NULL, NULL, NULL)", list(enumerate(fires)))
    for latent in range(len(fires)):
        for rank, ex in enumerate(synthetic(20, seed=latent)):
            con.execute(
                "INSERT INTO examples VALUES (?, 'top', ?, ?, ?)",
                (latent, rank, json.dumps(ex.tokens), json.dumps(ex.acts)),
            )
    for n, ex in enumerate(silent_text(30)):  # random text: latent 0 silent, latent 1 weakly active somewhere
        con.execute("INSERT INTO windows VALUES (?, ?, ?)", (n, json.dumps(ex.tokens), json.dumps([{"1": 0.1}] * 16)))
    con.commit()
    con.close()


def test_explain_n2g_writes_scores_and_says_why_a_latent_has_no_explanation(tmp_path):
    make_db(tmp_path / "features.db")  # an older database: no precision / recall / note columns yet
    assert explain_n2g(tmp_path) == 1
    con = sqlite3.connect(tmp_path / "features.db")
    row = con.execute("SELECT explanation, score, precision, recall, method, note FROM latents WHERE id = 0").fetchone()
    assert row[0].startswith('" def" " fib"') and row[1] > 0.9 and row[2] > 0.9 and row[3] > 0.9 and row[4] == "n2g"
    assert row[5] is None
    few = con.execute("SELECT explanation, score, note FROM latents WHERE id = 1").fetchone()
    assert few[0] is None and few[1] is None and f"needs {MIN_FIRES}" in few[2] and "fired 5 times" in few[2]


def test_missing_db(tmp_path):
    with pytest.raises(Exception, match="nanosae features"):
        explain_n2g(tmp_path)


def test_an_interrupted_pass_resumes_from_its_saved_rows_and_only_the_same_pass_does(tmp_path, monkeypatch):
    import shutil

    from nanosae.interp import explain as E

    make_db(tmp_path / "features.db")
    shutil.copy(tmp_path / "features.db", tmp_path / "before.db")
    monkeypatch.setattr(E, "PARTIAL_EVERY", 1)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        explain_n2g(tmp_path, progress=stop)
    partial = tmp_path / "features.db.explain.partial.json"
    assert (tmp_path / "features.db").read_bytes() == (tmp_path / "before.db").read_bytes()  # nothing written yet
    saved = json.loads(partial.read_text())
    assert [row[-1] for row in saved["updates"]] == [0]
    saved["updates"][0][0] = "SAVED BEFORE THE KILL"  # so the test can tell a resumed pass from a fresh one
    partial.write_text(json.dumps(saved))
    assert explain_n2g(tmp_path) == 1
    con = sqlite3.connect(tmp_path / "features.db")
    assert con.execute("SELECT explanation FROM latents WHERE id = 0").fetchone()[0] == "SAVED BEFORE THE KILL"
    con.close()
    assert not partial.exists()
    shutil.copy(tmp_path / "before.db", tmp_path / "features.db")
    partial.write_text(json.dumps(saved | {"fingerprint": saved["fingerprint"] | {"method": "llm"}}))
    explain_n2g(tmp_path)  # another pass's rows are not taken
    con = sqlite3.connect(tmp_path / "features.db")
    assert con.execute("SELECT explanation FROM latents WHERE id = 0").fetchone()[0].startswith('" def"')
