"""features.db against brute force: every activation computed and sorted the slow way."""

import json
import shutil

import pytest
import torch

import nanosae
from nanosae import SAE, DataConfig, SAEConfig
from nanosae.data import iter_documents, token_batches
from nanosae.interp.featuredb import open_db
from nanosae.interp.features import FeaturesConfig, build_features

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_model, word_corpus, tmp_path_factory):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=3, hook_name=HOOK))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(word_corpus)], context_size=16, split="all"),
        tokens=600,
        top_n=5,
        reservoir=8,
        quantile_examples=4,
        window_left=3,
        window_right=2,
        batch_size=4,
    )
    db = build_features(sae, tiny_model, cfg, tmp_path_factory.mktemp("feat") / "features.db")
    # brute force over exactly the same batches
    zs = []
    n = 0
    for batch in token_batches(iter_documents(cfg.data), tiny_model.tokenizer, 16, 4):
        if n >= cfg.tokens:
            break
        _, cache = tiny_model.run_with_cache(batch.tokens, [HOOK])
        z = sae.encode(cache[HOOK]) * batch.valid[..., None]
        zs.append(z[batch.valid])
        n += int(batch.valid.sum())
    return sae, cfg, db, torch.cat(zs).detach()


def test_density_mean_max(setup):
    sae, cfg, db, Z = setup
    con = open_db(db)
    meta = {r["key"]: json.loads(r["value"]) for r in con.execute("SELECT * FROM meta")}
    assert meta["tokens"] == len(Z) and meta["hook"] == HOOK
    for row in con.execute("SELECT * FROM latents"):
        col = Z[:, row["id"]]
        fired = col[col > 0]
        assert row["fires"] == len(fired)
        assert row["density"] == pytest.approx(len(fired) / len(Z))
        if len(fired):
            assert row["mean_act"] == pytest.approx(float(fired.mean()), rel=1e-5)
            assert row["max_act"] == pytest.approx(float(fired.max()), rel=1e-6)
        assert sum(json.loads(row["histogram"])) == len(fired)


@pytest.fixture(scope="module")
def windows(setup, tiny_model):
    """Brute force, per window of the same batches: each latent's largest activation there, and the tokens."""
    sae, cfg, _, _ = setup
    maxima, texts, n = [], [], 0
    for batch in token_batches(iter_documents(cfg.data), tiny_model.tokenizer, 16, 4):
        if n >= cfg.tokens:
            break
        _, cache = tiny_model.run_with_cache(batch.tokens, [HOOK])
        z = (sae.encode(cache[HOOK]) * batch.valid[..., None]).detach()
        maxima.append(z.amax(dim=1))
        texts += [[tiny_model.tokenizer.decode([t]) for t in row] for row in batch.tokens.tolist()]
        n += int(batch.valid.sum())
    return torch.cat(maxima), texts


def test_top_examples_are_the_largest_activations_one_per_window(setup, windows):
    """Each top example is a different window, shown at that window's strongest token for the latent: the
    top-n of the per-window maxima, not one passage re-centred on its other tokens."""
    sae, cfg, db, _ = setup
    maxima, _ = windows
    con = open_db(db)
    for i in range(sae.cfg.d_sae):
        rows = con.execute("SELECT * FROM examples WHERE latent=? AND kind='top' ORDER BY rank", (i,)).fetchall()
        col = maxima[:, i]
        expected = col[col > 0].sort(descending=True).values[: cfg.top_n].tolist()
        assert [r["activation"] for r in rows] == pytest.approx(expected, rel=1e-5)
        for r in rows:
            acts = json.loads(r["acts"])
            assert acts[r["focus"]] == pytest.approx(max(acts), abs=1e-4)  # the focus is the window's maximum


def test_examples_carry_their_context(setup):
    sae, cfg, db, Z = setup
    con = open_db(db)
    rows = con.execute("SELECT * FROM examples").fetchall()
    assert {r["kind"] for r in rows} == {"top", "quantile"}
    for r in rows:
        tokens, acts = json.loads(r["tokens"]), json.loads(r["acts"])
        assert len(tokens) == len(acts) == cfg.window_left + 1 + cfg.window_right
        assert acts[r["focus"]] == pytest.approx(r["activation"], abs=1e-4)  # stored to 4 decimals
        col = Z[:, r["latent"]]
        assert bool((torch.isclose(col, torch.tensor(r["activation"]), rtol=1e-4)).any())
    # quantile examples are sorted by activation and span the distribution
    for i in range(sae.cfg.d_sae):
        q = [
            r["activation"]
            for r in con.execute(
                "SELECT activation FROM examples WHERE latent=? AND kind='quantile' ORDER BY rank", (i,)
            )
        ]
        assert q == sorted(q)


def test_cofiring_and_logits(setup, tiny_model):
    sae, cfg, db, Z = setup
    con = open_db(db)
    A = (Z > 0).double()
    co = A.T @ A
    for row in con.execute("SELECT id, cofiring, top_logits FROM latents"):
        i = row["id"]
        pairs = json.loads(row["cofiring"])
        for j, p in pairs:
            assert p == pytest.approx(float(co[i, j] / max(co[i, i], 1)), abs=1e-4)
        if pairs:
            best = (co[i] / max(co[i, i], 1)).clone()
            best[i] = -1
            assert pairs[0][1] == pytest.approx(float(best.max()), abs=1e-4)
        W_U = tiny_model.module.lm_head.weight.T * tiny_model.module.model.norm.weight[:, None]
        effect = sae.W_dec[i] @ W_U
        top_ids = effect.topk(cfg.logit_top).indices.tolist()
        assert [t for t, _ in json.loads(row["top_logits"])] == [tiny_model.tokenizer.decode([t]) for t in top_ids]


def test_missing_db_names_the_command(tmp_path):
    with pytest.raises(Exception, match="nanosae features"):
        open_db(tmp_path)


def interrupted_pass(sae, model, cfg, out):
    """A features pass stopped by Ctrl-C after its third batch (its partial state saved)."""
    calls = []

    def stop(done, total, seconds):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_features(sae, model, cfg, out, progress=stop)


def test_resume_gives_the_same_database(setup, tiny_model, tmp_path):
    sae, cfg, db, _ = setup
    cfg.checkpoint_every = 1
    interrupted_pass(sae, tiny_model, cfg, tmp_path / "features.db")
    assert (tmp_path / "features.db.partial.pt").exists() and not (tmp_path / "features.db").exists()
    build_features(sae, tiny_model, cfg, tmp_path / "features.db")
    a, b = open_db(db), open_db(tmp_path / "features.db")
    q = "SELECT latent, kind, rank, activation, tokens, acts FROM examples ORDER BY latent, kind, rank"
    assert [tuple(r) for r in a.execute(q)] == [tuple(r) for r in b.execute(q)]
    q = "SELECT id, fires, histogram, cofiring FROM latents ORDER BY id"
    assert [tuple(r) for r in a.execute(q)] == [tuple(r) for r in b.execute(q)]
    assert not (tmp_path / "features.db.partial.pt").exists()


def test_a_partial_pass_of_another_model_is_not_resumed(setup, tiny_model, tiny_llama_dir, tmp_path):
    """Interrupted with model A, run again with model B: B's database is B's alone (the model is in the resume
    fingerprint), equal to a pass with B from scratch."""
    import dataclasses

    from transformers import LlamaForCausalLM

    sae, cfg, _, _ = setup
    cfg = dataclasses.replace(cfg, checkpoint_every=1)
    other = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(7)
    for p in other.parameters():
        p.data.normal_(std=0.05)
    other.save_pretrained(tmp_path / "b")
    shutil.copy(tiny_llama_dir / "tokenizer.json", tmp_path / "b")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, tmp_path / "b")
    model_b = nanosae.load_model(str(tmp_path / "b"))
    interrupted_pass(sae, tiny_model, cfg, tmp_path / "features.db")
    build_features(sae, model_b, cfg, tmp_path / "features.db")
    build_features(sae, model_b, cfg, tmp_path / "fresh.db")
    a, b = open_db(tmp_path / "features.db"), open_db(tmp_path / "fresh.db")
    q = "SELECT id, fires, histogram, cofiring FROM latents ORDER BY id"
    assert [tuple(r) for r in a.execute(q)] == [tuple(r) for r in b.execute(q)]


@pytest.mark.parametrize("pack", [True, False])
def test_features_from_a_store_equal_features_from_the_model(tiny_model, word_corpus, tmp_path, pack):
    """The store's token ids rebuild the collection's windows (BOS separators and padding included), so a
    database built from stored activations equals one built by running the model on the same text."""
    from nanosae import CollectConfig
    from nanosae.data import collect, write_store

    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=3, hook_name=HOOK))
    data = DataConfig(specs=[str(word_corpus)], context_size=16, split="all", pack=pack)
    cfg = FeaturesConfig(
        data=data, tokens=500, top_n=5, reservoir=8, quantile_examples=4, window_left=3, window_right=2, batch_size=4
    )
    store = collect(
        CollectConfig(
            model="tiny",
            hooks=[HOOK],
            data=data,
            tokens=800,
            batch_size=4,
            dtype="float32",
            tokens_per_shard=100,
            out=str(tmp_path / "acts"),
        ),
        model=tiny_model,
    )[HOOK]
    from_model = build_features(sae, tiny_model, cfg, tmp_path / "model.db")
    from_store = build_features(sae, tiny_model, cfg, tmp_path / "store.db", acts=store)
    a, b = open_db(from_model), open_db(from_store)
    for table, order in (("latents", "id"), ("examples", "latent, kind, rank")):
        rows_a = [tuple(r) for r in a.execute(f"SELECT * FROM {table} ORDER BY {order}")]
        rows_b = [tuple(r) for r in b.execute(f"SELECT * FROM {table} ORDER BY {order}")]
        assert len(rows_a) >= 16 and rows_a == rows_b, table
    bos = json.dumps(tiny_model.tokenizer.decode([tiny_model.tokenizer.bos_id]))[1:-1]
    assert any(bos in r["tokens"] for r in b.execute("SELECT tokens FROM examples"))  # separators are shown
    meta = lambda con: {r["key"]: r["value"] for r in con.execute("SELECT * FROM meta") if r["key"] != "created"}
    assert meta(a) == meta(b)

    bare = write_store(tmp_path / "bare", store.tokens(0, 200), hook=HOOK, context_size=16)
    with pytest.raises(nanosae.FormatError, match="has no token ids"):
        build_features(sae, tiny_model, cfg, tmp_path / "bare.db", acts=bare)
    other = write_store(tmp_path / "other", store.tokens(0, 200), hook="blocks.0.hook_resid_post", context_size=16)
    with pytest.raises(nanosae.DataError, match="holds blocks.0.hook_resid_post activations but the SAE reads"):
        build_features(sae, tiny_model, cfg, tmp_path / "other.db", acts=other)


def test_run_paths_with_uri_characters_are_files_not_queries(setup, tmp_path):
    """'#' and '?' end a file name inside an SQLite URI: explanations must land in the run's own database."""
    import shutil

    from nanosae.interp.explain import explain_n2g

    _, _, db, _ = setup
    for name in ("r#A", "r?mode=rw", "r%20b"):
        run = tmp_path / name
        run.mkdir()
        shutil.copy(db, run / "features.db")
        assert open_db(run).execute("SELECT COUNT(*) FROM latents").fetchone()[0] == 16
        explain_n2g(run)
        assert {p.name for p in tmp_path.iterdir()} <= {"r#A", "r?mode=rw", "r%20b"}  # no stray 'r' database
        assert sorted(p.name for p in run.iterdir()) == ["features.db"]


def test_not_a_database_and_bad_settings_are_one_line_errors(setup, tiny_model, tmp_path):
    sae, cfg, _, _ = setup
    (tmp_path / "features.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(nanosae.FormatError, match="is not a features database"):
        open_db(tmp_path)
    for bad in (dict(batch_size=0), dict(top_n=-3), dict(tokens=0)):
        with pytest.raises(nanosae.ConfigError, match=next(iter(bad))):
            FeaturesConfig(**bad)


def test_byte_pieces_of_one_character_are_merged():
    """A byte-level tokenizer splits 'é' and '🙂' over several tokens, each decoding to U+FFFD alone: the
    feature database shows the character on its first token and nothing on the others, so texts and
    activations stay aligned."""
    from nanosae.interp.features import readable

    data = "aé🙂b".encode()  # one token per byte: a, 2 bytes, 4 bytes, b
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    pieces = readable(decode, list(data), lambda i: decode([i]))
    assert pieces == ["a", "é", "", "🙂", "", "", "", "b"]
    assert readable(decode, [-1, *data[:3]], lambda i: "" if i < 0 else decode([i])) == ["", "a", "é", ""]


def test_a_passage_repeated_in_the_corpus_is_shown_once_per_latent(tiny_model, tmp_path):
    """The same passage 20 times (other documents between the copies): no latent shows two windows sharing a run
    of 8 tokens, and the list still fills from the other text."""
    import random

    from tests.conftest import word_docs, write_corpus

    rng = random.Random(5)
    passage = " ".join(f"w{rng.randrange(3, 64)}" for _ in range(40))
    docs = word_docs(200, seed=11, min_words=30, max_words=60)
    for n in range(20):
        docs.insert(n * 10, passage)
    corpus = write_corpus(tmp_path / "repeated.jsonl", docs)
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=3, hook_name=HOOK))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(corpus)], context_size=32, split="all"),
        tokens=6000,
        top_n=6,
        reservoir=8,
        quantile_examples=4,
        window_left=12,
        window_right=4,
        batch_size=8,
    )
    con = open_db(build_features(sae, tiny_model, cfg, tmp_path / "features.db"))
    ids = tiny_model.tokenizer.encode(passage)
    passage_runs = {tuple(ids[j : j + 8]) for j in range(len(ids) - 7)}
    from_passage = 0
    for latent in range(sae.cfg.d_sae):
        rows = con.execute("SELECT tokens FROM examples WHERE latent=? AND kind='top' ORDER BY rank", (latent,))
        windows = [tiny_model.tokenizer.encode(" ".join(json.loads(r["tokens"]))) for r in rows]  # word tokens
        runs = [{tuple(w[j : j + 8]) for j in range(len(w) - 7)} for w in windows]
        for a in range(len(runs)):
            for b in range(a):
                assert not runs[a] & runs[b], f"latent {latent}: examples {b} and {a} show the same passage"
        from_passage += sum(bool(r & passage_runs) for r in runs)
        assert len(windows) == cfg.top_n  # filled from the other text
    assert 0 < from_passage <= sae.cfg.d_sae  # the passage is shown, at most once per latent


def test_each_random_window_knows_its_document(tiny_model, tmp_path):
    """The feature pass numbers documents as it reads them (packed rows continue a document until a BOS inside
    them starts the next): every random window's centre token lies in the run of its document's text."""
    from tests.conftest import word_docs, write_corpus

    docs = word_docs(60, seed=21, min_words=20, max_words=90)
    corpus = write_corpus(tmp_path / "docs.jsonl", docs)
    torch.manual_seed(7)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=3, hook_name=HOOK))
    cfg = FeaturesConfig(
        data=DataConfig(specs=[str(corpus)], context_size=32, split="all"),
        tokens=20_000,
        random_windows=400,
        window_left=6,
        window_right=3,
        batch_size=4,
    )
    con = open_db(build_features(sae, tiny_model, cfg, tmp_path / "features.db"))
    rows = con.execute("SELECT tokens, doc FROM windows").fetchall()
    assert len(rows) > 100 and len({r["doc"] for r in rows}) > 20
    for r in rows:
        tokens = json.loads(r["tokens"])
        lo = hi = 6  # the centre: a token the pass reads, so a word of its document
        while lo > 0 and tokens[lo - 1] not in ("", "<bos>"):
            lo -= 1
        while hi + 1 < len(tokens) and tokens[hi + 1] not in ("", "<bos>"):
            hi += 1
        assert " ".join(tokens[lo : hi + 1]) in docs[r["doc"]], (r["doc"], tokens)
