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


def natural_text(n: int, seed: int = 0) -> list[Example]:
    """Random windows of the text: the planted pair (where the latent fires) in about a third of them."""
    rng = random.Random(seed + 7)
    firing, silent = iter(synthetic(n, seed + 50)), iter(silent_text(n, seed + 50))
    return [next(firing) if rng.random() < 0.35 else next(silent) for _ in range(n)]


def test_n2g_recovers_the_planted_pattern():
    evidence = Evidence(synthetic(30), natural_text(600), max_act=6.0, fires=60)
    patterns, found = explain_latent(evidence)
    assert patterns[0] == (" def", " fib")
    assert found.score > 0.9 and found.precision > 0.9 and found.recall > 0.9 and found.f1 > 0.9
    assert found.sure and found.n_active > 50 and found.n_silent > 100
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
    shuffled = random.Random(9)
    natural = code_windows(200, 5, True) + code_windows(200, 6, False)
    shuffled.shuffle(natural)
    evidence = Evidence(code_windows(30, 3, True), natural, max_act=4.0, fires=60)
    patterns, found = explain_latent(evidence)
    assert patterns[0] == ("def", " ") and found.score > 0.95


def test_one_folded_pattern_for_a_word_in_any_case():
    """A latent firing on ' decimal' and 'Decimal' (and ' DECIMAL') gets one pattern that covers all three,
    and scores near 1 on held-out text."""
    rng = random.Random(3)
    forms = [" decimal", "Decimal", " Decimal", " DECIMAL"]

    def window(fires: bool) -> Example:
        tokens = [rng.choice(WORDS) for _ in range(16)]
        if fires:
            tokens[rng.randrange(16)] = rng.choice(forms)
        return Example(tokens, [5.0 if t in forms else 0.0 for t in tokens])

    evidence = Evidence([window(True) for _ in range(30)], [window(rng.random() < 0.3) for _ in range(800)], 5.0, 90)
    patterns, found = explain_latent(evidence)
    assert patterns == [("\x00decimal",)] and describe(patterns) == '~"decimal"'
    assert found.score > 0.97 and found.sure


def test_a_word_explanation_scores_well_below_1_where_the_word_also_appears_without_the_latent():
    """The latent fires on 'self' inside method bodies ('(self'), silent on 'self' in prose: the explanation
    'self' recalls every active window but the hard negatives (prose with 'self') pull its score well below 1,
    while '(' 'self' scores near 1."""
    rng = random.Random(4)

    def window(kind: str) -> Example:
        tokens = [rng.choice(WORDS) for _ in range(16)]
        p = rng.randrange(1, 16)
        if kind == "method":
            tokens[p - 1], tokens[p] = "(", "self"
        elif kind == "prose":
            tokens[p] = "self"
        return Example(tokens, [4.0 if t == "self" and tokens[i - 1] == "(" else 0.0 for i, t in enumerate(tokens)])

    held_out = [window(rng.choice(["method", "prose", "none", "none"])) for _ in range(1000)]
    word = detection(lambda toks: found_in([("self",)], toks), held_out, 1.0, hard={"self"})
    right = detection(lambda toks: found_in([("(", "self")], toks), held_out, 1.0, hard={"self"})
    assert word.recall == 1.0 and word.score < 0.8 and word.n_hard > 100
    assert right.score > 0.97


def test_the_interval_is_agresti_coull_combined_by_the_mix_and_narrows_with_n():
    """Counts built by hand: a active windows with r said "fires", h hard negatives and s random silent windows
    with none said "fires"; the interval is the one the module docstring states, computed here by hand."""

    def windows(active: int, said: int, hard: int, silent: int) -> list[Example]:
        out = [Example([" yes" if i < said else " no", " x"], [2.0, 0.0]) for i in range(active)]
        out += [Example([" no", " tok"], [0.0, 0.0]) for _ in range(hard)]
        return out + [Example([" no", " x"], [0.0, 0.0]) for _ in range(silent)]

    def by_hand(active: int, said: int, hard: int, silent: int) -> tuple[float, float]:
        v = lambda x, n: (x + 2) / (n + 4) * (1 - (x + 2) / (n + 4)) / (n + 4)
        score = (said / active + (1 + 1) / 2) / 2
        half = 1.96 * ((v(said, active) + (v(hard, hard) + v(silent, silent)) / 4) / 4) ** 0.5
        return score, half

    says = lambda toks: " yes" in toks
    small = detection(says, windows(10, 8, 5, 15), 1.0, hard={"tok"})
    large = detection(says, windows(40, 32, 20, 60), 1.0, hard={"tok"})
    for found, counts in ((small, (10, 8, 5, 15)), (large, (40, 32, 20, 60))):
        score, half = by_hand(*counts)
        assert found.score == pytest.approx(score) and found.n_hard == counts[2]
        assert found.low == pytest.approx(max(0, score - half)) and found.high == pytest.approx(min(1, score + half))
    assert large.half_width < 0.6 * small.half_width  # four times the windows: near half as wide (before clipping)
    assert not small.sure and large.sure  # ±0.1 is the line between stating a score and saying why not


def make_db(path, fires=(60, 5), planted=(0,)):
    """Latents `planted` fire on the planted pair in the random text too; the others weakly everywhere."""
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE latents (id INTEGER PRIMARY KEY, fires INTEGER, max_act REAL, density REAL,
                         explanation TEXT, score REAL, method TEXT);
                         CREATE TABLE examples (latent INTEGER, kind TEXT, rank INTEGER, tokens TEXT, acts TEXT);
                         CREATE TABLE windows (id INTEGER PRIMARY KEY, tokens TEXT, latents TEXT);""")
    con.executemany("INSERT INTO latents VALUES (?, ?, 6.0, 0.01, NULL, NULL, NULL)", list(enumerate(fires)))
    for latent in range(len(fires)):
        for rank, ex in enumerate(synthetic(20, seed=latent)):
            con.execute(
                "INSERT INTO examples VALUES (?, 'top', ?, ?, ?)",
                (latent, rank, json.dumps(ex.tokens), json.dumps(ex.acts)),
            )
    # random text: the planted latents fire where the pair is (about a third of the windows), the rest weakly
    weak = {str(latent): 0.1 for latent in range(len(fires)) if latent not in planted}
    for n, ex in enumerate(natural_text(600)):
        per_token = [{str(latent): a for latent in planted} | weak if a else dict(weak) for a in ex.acts]
        con.execute("INSERT INTO windows VALUES (?, ?, ?)", (n, json.dumps(ex.tokens), json.dumps(per_token)))
    con.commit()
    con.close()


def test_explain_n2g_writes_scores_and_says_why_a_latent_has_no_explanation(tmp_path):
    make_db(tmp_path / "features.db")  # an older database: none of the score columns yet
    assert explain_n2g(tmp_path) == 1
    con = sqlite3.connect(tmp_path / "features.db")
    row = con.execute(
        "SELECT explanation, score, precision, recall, method, note, score_low, score_high, n_active, n_silent, f1 "
        "FROM latents WHERE id = 0"
    ).fetchone()
    assert row[0].startswith('" def" " fib"') and row[1] > 0.9 and row[2] > 0.9 and row[3] > 0.9 and row[4] == "n2g"
    assert row[5] is None and row[6] <= row[1] <= row[7] and row[7] - row[6] <= 0.2 and row[8] > 50 and row[10] > 0.9
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


# ---- the stored score holds on text the explanation never saw ---------------------------------------------------
def _patterns_of(explanation: str) -> list[list]:
    """An N2G explanation read back: ' | ' between patterns, '*' a wildcard, ~"x" a folded token, "x" an exact one."""
    out = []
    for part in explanation.split(" | "):
        words = []
        for word in part.split(" "):
            if word == "*":
                words.append(None)
            else:
                folded = word.startswith("~")
                words.append(("fold", json.loads(word[1:])) if folded else ("exact", json.loads(word)))
        out.append(words)
    return out


def _token_fold(t: str) -> str:
    return t.lstrip(" ▁Ġ").lower()


def _matches(patterns: list[list], tokens: list[str]) -> bool:
    def same(want, tok: str) -> bool:
        return want is None or (tok == want[1] if want[0] == "exact" else _token_fold(tok) == _token_fold(want[1]))

    # pattern shapes: (t0), (t-1, t0), (t-2, *, t0), (t-2, t-1, t0), all ending at a token
    return any(
        all(same(w, tokens[end - len(p) + 1 + i]) for i, w in enumerate(p))
        for p in patterns
        for end in range(len(p) - 1, len(tokens))
        if all(tokens[end - len(p) + 1 : end + 1])
    )


def test_stored_scores_hold_on_new_text(tiny_model, tmp_path):
    """The protocol written out here, applied to text the feature pass never read (eight times as much of it),
    lands inside the stored score's 95% interval for at least 90% of the latents with a stated score."""
    import torch

    from nanosae import SAE, DataConfig, SAEConfig
    from nanosae.data import iter_documents, token_batches
    from nanosae.interp.featuredb import open_db
    from nanosae.interp.features import FeaturesConfig, build_features
    from tests.conftest import word_docs, write_corpus

    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(6)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name=hook))
    text = tmp_path / "text.jsonl"  # more than the pass reads: the random windows are a sample of it
    write_corpus(text, word_docs(3000, seed=5, min_words=40))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(text)], context_size=48, split="all"),
        tokens=40_000,
        top_n=10,
        reservoir=16,
        random_windows=1024,
        window_left=12,
        window_right=4,
        batch_size=32,
    )
    db = build_features(sae, tiny_model, cfg, tmp_path / "features.db")
    explain_n2g(db)
    con = open_db(db)
    stored = con.execute(
        "SELECT id, max_act, explanation, score, score_low, score_high FROM latents WHERE score IS NOT NULL"
    ).fetchall()
    assert len(stored) >= 8

    # new text: other documents, each row cut into 17-token windows from a random offset (kept when the token 12
    # in is one the pass reads), as the feature pass samples them, with every latent's activation on them
    fresh = tmp_path / "fresh.jsonl"
    write_corpus(fresh, word_docs(6000, seed=99, min_words=40))
    rng, windows = random.Random(0), []
    fresh_docs = iter_documents(DataConfig(specs=[str(fresh)], split="all"))
    for batch in token_batches(fresh_docs, tiny_model.tokenizer, 48, 32):
        _, cache = tiny_model.run_with_cache(batch.tokens, [hook])
        z = (sae.encode(cache[hook]) * batch.valid[..., None]).detach()
        for row, valid, acts in zip(batch.tokens.tolist(), batch.valid.tolist(), z):
            start = rng.randrange(0, 48 - 2 * 17 + 1)
            for lo in (start, start + 17):
                if valid[lo + 12]:
                    windows.append(([tiny_model.tokenizer.decode([i]) for i in row[lo : lo + 17]], acts[lo : lo + 17]))
        if len(windows) >= 8 * 512:
            break
    inside = 0
    for r in stored:
        threshold = 0.25 * r["max_act"]
        counts: dict[str, int] = {}
        for e in con.execute("SELECT tokens, acts FROM examples WHERE latent = ?", (r["id"],)):
            for tok, act in zip(json.loads(e["tokens"]), json.loads(e["acts"])):
                if tok and act >= threshold:
                    counts[_token_fold(tok)] = counts.get(_token_fold(tok), 0) + 1
        hard = set(sorted(counts, key=lambda t: (-counts[t], t))[:5])
        patterns = _patterns_of(r["explanation"])
        said = {"active": [], "hard": [], "random": []}
        for tokens, acts in windows:
            kind = (
                "active"
                if float(acts[:, r["id"]].max()) >= threshold
                else ("hard" if any(_token_fold(t) in hard for t in tokens if t) else "random")
            )
            said[kind].append(_matches(patterns, tokens))
        recall = sum(said["active"]) / len(said["active"])
        silent = [1 - sum(v) / len(v) for k, v in said.items() if k != "active" and v]
        score = (recall + sum(silent) / len(silent)) / 2
        inside += r["score_low"] <= score <= r["score_high"]
    assert inside >= 0.9 * len(stored), f"{inside} of {len(stored)} recomputed scores inside the stored intervals"


def test_windows_of_one_document_count_as_one_piece_of_evidence():
    """Twenty active windows from two documents, all of one saying "fires" and all of the other not: the recall
    0.5 rests on two documents, not twenty windows, and its variance is the clustered one, by hand."""
    from nanosae.interp.explain import clustered_variance, variance

    active = [Example([" yes"], [2.0], 0)] * 10 + [Example([" no"], [2.0], 1)] * 10
    outcomes = [True] * 10 + [False] * 10
    assert clustered_variance(outcomes, [0] * 10 + [1] * 10) == pytest.approx(2 / 1 * (25 + 25) / 400)
    assert variance(outcomes, active) == pytest.approx(0.25)  # larger than Agresti-Coull's 0.6·0.4/24 = 0.01
    assert variance(outcomes, [Example([" yes"], [2.0])] * 20) == pytest.approx(0.5 * 0.5 / 24)  # unknown documents
    silent = [Example([" no"], [0.0], 2 + i) for i in range(40)]
    found = detection(lambda toks: " yes" in toks, active + silent, 1.0)
    # the silent windows are one per document and all right: Agresti-Coull's variance is the larger there
    assert found.recall == 0.5 and not found.sure
    assert found.half_width == pytest.approx(1.96 * ((0.25 + proportion(40, 40)) / 4) ** 0.5)


def proportion(hits: int, n: int) -> float:
    p = (hits + 2) / (n + 4)
    return p * (1 - p) / (n + 4)
