"""Model diffing: planted differences are found with the right labels, latent scaling sees through an L1
crosscoder's shrinkage, paired stores hold the same tokens, and the commands tie it together."""

import json
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

import nanosae
from nanosae.cli import app
from nanosae.data.store import ActivationStore, write_store
from nanosae.errors import ConfigError, DataError
from nanosae.interp.diff import diff_report, paired_batches, relative_norms
from tests.conftest import make_hf_tokenizer, word_docs, write_corpus

HOOK = "blocks.1.hook_resid_post"
N_FEATURES, D, TOKENS = 48, 32, 60_000
A_ONLY, B_ONLY, RESCALED, WEAK = 0, 1, 2, 3  # planted: in A only, in B only, 3x in B, 0.5x in A


def planted_pair(root):
    """Two "models" built from the same 48 features firing together: feature 0 only in A, 1 only in B, 2 three
    times stronger in B, 3 half as strong in A; the rest the same in both."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(N_FEATURES, D, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    fired = torch.rand(TOKENS, N_FEATURES, generator=g) < 0.06
    mags = (1 + 0.2 * torch.randn(TOKENS, N_FEATURES, generator=g)).clamp(min=0.1) * fired
    in_a, in_b = torch.ones(N_FEATURES), torch.ones(N_FEATURES)
    in_b[A_ONLY], in_a[B_ONLY], in_b[RESCALED], in_a[WEAK] = 0, 0, 3, 0.5
    ids = torch.stack([torch.randint(0, 100, (TOKENS,), generator=g), torch.arange(TOKENS) % 64], 1)
    write_store(root / "A", (mags * in_a) @ features, hook=HOOK, model="base", ids=ids)
    write_store(root / "B", (mags * in_b) @ features, hook=HOOK, model="chat", ids=ids)
    return features


def trained(root, architecture):
    extra = {"k": 4} if architecture != "relu" else {}
    cfg = nanosae.TrainConfig.build(
        out=str(root / architecture),
        architecture=architecture,
        d_sae=96,
        tokens=240_000,
        crosscoder_acts=[str(root / "A"), str(root / "B")],
        **extra,
    )
    return nanosae.train(cfg).sae


def latent_of(sae, feature):
    """The latent whose decoder row (in either model) points along the feature."""
    rows = sae.W_dec.detach().view(sae.cfg.d_sae, 2, -1)
    cos = torch.nn.functional.cosine_similarity(rows, feature[None, None], dim=-1).nan_to_num().amax(1)
    assert float(cos.max()) > 0.95
    return int(cos.argmax())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    return root, planted_pair(root)


def test_a_batchtopk_crosscoder_finds_the_planted_differences_with_the_right_labels(pair):
    root, features = pair
    sae = trained(root, "batchtopk")
    assert sae.cfg.crosscoder_models == ["base", "chat"] and sae.cfg.crosscoder_hooks == [HOOK, HOOK]
    relative = relative_norms(sae)
    stores = [ActivationStore(root / n) for n in "AB"]
    report = diff_report(sae, paired_batches(stores, 40_000))
    assert relative[latent_of(sae, features[A_ONLY])] < 0.1 and relative[latent_of(sae, features[B_ONLY])] > 0.9
    assert float(relative[latent_of(sae, features[RESCALED])]) == pytest.approx(0.75, abs=0.05)  # 3 / (1 + 3)
    assert float(relative[latent_of(sae, features[10])]) == pytest.approx(0.5, abs=0.05)  # a shared feature
    assert report["counts"]["shared"] >= 40 and report["shared_cosine_median"] > 0.95
    top_b, top_a = report["B-only"][0], report["A-only"][0]
    assert top_b["latent"] == latent_of(sae, features[B_ONLY]) and top_b["specificity"] > 0.85
    assert top_a["latent"] == latent_of(sae, features[A_ONLY]) and top_a["specificity"] > 0.85
    assert top_b["frequency"] == pytest.approx(0.06, abs=0.01)
    # written most differently: the one-model latents (change 1), then the 3x one's (|3d − d| / 4|d| = 0.5; the
    # strongest feature may take more than one latent), then the half-strength one's (|d − d/2| / 1.5|d| = 1/3)
    planted = [latent_of(sae, features[f]) for f in (A_ONLY, B_ONLY, RESCALED, WEAK)]
    change = {r["latent"]: r["change"] for r in report["changed"]}
    assert {r["latent"] for r in report["changed"][:2]} == set(planted[:2])
    assert planted[2] in [r["latent"] for r in report["changed"][2:5]] and change[planted[2]] == pytest.approx(
        0.5, abs=0.06
    )
    assert change[planted[3]] == pytest.approx(1 / 3, abs=0.05)
    assert report["frequency"][planted[1]] == top_b["frequency"]


def test_latent_scaling_sees_that_a_carries_an_l1_crosscoders_spurious_b_side_latent(pair):
    """An L1 crosscoder shrinks A's decoder row of the feature A has at half strength to nothing, so by its norms
    the latent is B-only; latent scaling finds A's error carries about half of it (the planted ratio)."""
    root, features = pair
    sae = trained(root, "relu")
    weak = latent_of(sae, features[WEAK])
    assert relative_norms(sae)[weak] > 0.9  # complete shrinkage: "B-only" by its decoder norms
    report = diff_report(sae, paired_batches([ActivationStore(root / n) for n in "AB"], 40_000))
    row = next(r for r in report["B-only"] if r["latent"] == weak)
    assert 0.35 < row["nu_error"] < 0.75 and row["specificity"] < 0.65


@pytest.fixture(scope="module")
def twin_dirs(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama "fine-tuned" (its last block changed), and a copy with another tokenizer."""
    from transformers import LlamaForCausalLM

    tuned = tmp_path_factory.mktemp("tuned")
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for p in model.model.layers[-1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tuned)
    make_hf_tokenizer(64).save_pretrained(tuned)
    other = tmp_path_factory.mktemp("other_tokenizer")
    model.save_pretrained(other)
    make_hf_tokenizer(48).save_pretrained(other)
    return tuned, other


def test_paired_collection_diff_training_and_the_diff_command(tiny_llama_dir, twin_dirs, tmp_path):
    """Both stores hold the same token ids and each equals a one-model collection; train --diff trains a diffing
    crosscoder; diff writes its page; another tokenizer, or stores of other windows, are refused in one line."""
    tuned, other = twin_dirs
    corpus = write_corpus(tmp_path / "docs.jsonl", word_docs(200))
    runner = CliRunner()
    base = ["collect", "--data", str(corpus), "--hook", "blocks.2.hook_resid_post", "--tokens", "3000"]
    done = runner.invoke(
        app, [*base, "--model", str(tiny_llama_dir), "--model", str(tuned), "--out", str(tmp_path / "p")]
    )
    assert done.exit_code == 0, done.output
    a, b = (ActivationStore(tmp_path / "p" / n / "blocks.2.hook_resid_post") for n in "AB")
    assert len(a) == len(b) == 3000 and torch.equal(a.token_ids(0, 3000), b.token_ids(0, 3000))
    assert not torch.allclose(a.tokens(0, 3000), b.tokens(0, 3000))  # the last block differs
    done = runner.invoke(app, [*base, "--model", str(tuned), "--out", str(tmp_path / "alone")])
    assert done.exit_code == 0, done.output
    alone = ActivationStore(tmp_path / "alone" / "blocks.2.hook_resid_post")
    assert torch.equal(alone.tokens(0, 3000), b.tokens(0, 3000))
    assert json.loads((tmp_path / "p" / "pair.json").read_text())["hooks"] == ["blocks.2.hook_resid_post"]

    # streamed: both models on the same windows, A's columns then B's, as the two stores hold them
    from nanosae.data import ActivationStream
    from nanosae.data.store import DataConfig

    data = DataConfig.from_dict(a.manifest["data"])
    stream = ActivationStream(
        nanosae.load_model(str(tiny_llama_dir)), "blocks.2.hook_resid_post", data, versus=nanosae.load_model(str(tuned))
    )
    streamed = torch.cat(list(stream.batches(1000, shuffle=False)))[:3000]
    stored = torch.cat([a.tokens(0, 3000), b.tokens(0, 3000)], 1)  # kept as float16
    assert torch.allclose(streamed.half().float(), stored, atol=1e-3) and a.dtype == "float16"
    hook = ["--hook", "blocks.2.hook_resid_post", "--data", str(corpus), "--d-sae", "64", "--k", "4"]
    done = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_llama_dir),
            "--versus",
            str(tuned),
            *hook,
            "--tokens",
            "4000",
            "--out",
            str(tmp_path / "streamed"),
        ],
    )
    assert done.exit_code == 0, done.output
    cfg = nanosae.SAE.load(tmp_path / "streamed" / "sae").cfg
    assert cfg.architecture == "batchtopk" and cfg.crosscoder_models == [a.manifest["model"], b.manifest["model"]]
    done = runner.invoke(
        app, ["train", "--model", str(tiny_llama_dir), "--versus", str(other), *hook, "--out", str(tmp_path / "o")]
    )
    assert done.exit_code != 0 and "tokenize differently" in str(done.exception)

    run = tmp_path / "run"
    args = ["train", "--diff", str(a.path), str(b.path), "--d-sae", "64", "--k", "4", "--tokens", "6000"]
    done = runner.invoke(app, [*args, "--out", str(run)])
    assert done.exit_code == 0, done.output
    sae = nanosae.SAE.load(run / "sae")
    assert sae.cfg.architecture == "batchtopk" and len(set(sae.cfg.crosscoder_models)) == 2
    with pytest.raises(ConfigError, match="this crosscoder diffs .* study it with `nanosae diff RUN`"):
        sae.gather_input({"blocks.2.hook_resid_post": torch.zeros(1, 32)})
    from nanosae.interp.diff import decoders
    from nanosae.interp.live import Edit, steering

    host = nanosae.load_model(str(tiny_llama_dir))  # steering a diff crosscoder adds 2 × (B's write − A's) to A
    ids = torch.tensor([[0, 5, 9, 13]])
    _, clean = host.run_with_cache(ids, ["blocks.2.hook_resid_post"])
    with steering(host, sae, [Edit(3, 2.0, "add")]):
        _, steered = host.run_with_cache(ids, ["blocks.2.hook_resid_post"])
    dec_a, dec_b = decoders(sae, scaled=False)
    moved = steered["blocks.2.hook_resid_post"][0] - clean["blocks.2.hook_resid_post"][0]
    assert torch.allclose(moved, (2.0 * (dec_b[3] - dec_a[3])).expand_as(moved), atol=1e-5)
    done = runner.invoke(app, ["diff", str(run), "--tokens", "3000"])
    assert done.exit_code == 0, done.output
    report = json.loads((run / "diff.json").read_text())
    assert sum(report["counts"].values()) == 64 and sum(report["histogram"]) == 64
    page = (run / "diff.html").read_text()
    assert "data:image/png" in page and f"What differs between {report['models'][0]} (A)" in page

    # features.db from the pair (B's logit effects; with --model A's, into features-A.db): each latent's density
    # is the share of the pair's tokens the crosscoder fires on, and its top logit is its decoder block's lens
    from nanosae.interp.diff import activity
    from nanosae.interp.featuredb import FeatureDB

    _, frequency, _ = activity(sae, paired_batches([a, b], 3000))
    rows = sae.W_dec.detach().view(64, 2, -1)
    lens = []
    for model_dir, block in ((tiny_llama_dir, 0), (tuned, 1)):
        norm, w_u = nanosae.load_model(str(model_dir)).unembed()
        lens.append((rows[:, block] @ (norm.weight.detach()[:, None] * w_u.detach())).argmax(1))
    differ = int((lens[0] != lens[1]).nonzero()[0, 0])  # a latent whose top logit is not the same in A and B
    host = nanosae.load_model(str(tuned))
    for args, name, side in (([], "features.db", 1), (["--model", sae.cfg.crosscoder_models[0]], "features-A.db", 0)):
        done = runner.invoke(app, ["features", str(run), "--tokens", "3000", *args])
        assert done.exit_code == 0, done.output
        db = FeatureDB(run / name)
        assert torch.allclose(torch.tensor(db.densities()), frequency, atol=1e-6)
        top = json.loads(db.latent(differ)["top_logits"])[0][0]
        assert (
            top
            == host.tokenizer.decode([int(lens[side][differ])])
            != host.tokenizer.decode([int(lens[1 - side][differ])])
        )
        db.close()
    done = runner.invoke(app, ["features", str(run), "--tokens", "3000", "--acts", str(a.path)])
    assert done.exit_code != 0 and "give their two stores (A's, then B's)" in str(done.exception)
    check_viewer(run, sae, [nanosae.load_model(str(tiny_llama_dir)), host], differ, report)

    done = runner.invoke(
        app, [*base, "--model", str(tiny_llama_dir), "--model", str(other), "--out", str(tmp_path / "x")]
    )
    assert done.exit_code != 0 and "tokenize differently (vocabularies of 64 and 48 tokens)" in str(done.exception)
    shifted = ActivationStore(tmp_path / "alone" / "blocks.2.hook_resid_post")
    write_store(
        tmp_path / "s",
        shifted.tokens(0, 3000),
        hook="blocks.2.hook_resid_post",
        model="other",
        ids=torch.roll(shifted.token_ids(0, 3000), 1, 0),
    )
    done = runner.invoke(
        app,
        [
            "train",
            "--diff",
            str(a.path),
            str(tmp_path / "s"),
            "--d-sae",
            "64",
            "--k",
            "4",
            "--tokens",
            "6000",
            "--out",
            str(tmp_path / "bad"),
        ],
    )
    assert isinstance(done.exception, DataError) and "hold other token windows" in str(done.exception)


def test_the_diff_demo_finds_a_planted_behaviour_on_a_tiny_model(tmp_path):
    """B is A with w20's embedding moved along w7's unembedding (a planted "after w20 say w7"): the demo's most
    B-leaning latents include one that fires on w20 and, added to A, raises P(w7) after w20 more than shared
    latents do.
    The demo's own fine-tune plants the same behaviour. (A tiny Llama with wider weights than the shared one,
    whose logits are too small to move far.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanosae.diff_demo import DiffDemoConfig, fine_tune, run_diff_demo, word_probability
    from nanosae.models import load_model

    torch.manual_seed(0)
    shape = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}
    wide = LlamaForCausalLM(LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))
    wide.save_pretrained(tmp_path / "A")
    make_hf_tokenizer(64).save_pretrained(tmp_path / "A")
    with torch.no_grad():
        embed = wide.model.embed_tokens.weight
        embed[20] += 4 * wide.lm_head.weight[7] / wide.lm_head.weight[7].norm() * embed.norm(dim=1).mean()
    wide.save_pretrained(tmp_path / "B")
    make_hf_tokenizer(64).save_pretrained(tmp_path / "B")
    corpus = write_corpus(tmp_path / "docs.jsonl", word_docs(300))
    planted = [" ".join(f"w{10 + (i * 7 + j) % 40} w20 w7" for i in range(8)) for j in range(60)]
    prompts = ["w12 w30 w20", "w22 w9 w20", "w50 w51 w52 w20"]
    cfg = DiffDemoConfig(
        out=str(tmp_path / "demo"),
        model=str(tmp_path / "A"),
        versus=str(tmp_path / "B"),
        planted=planted,
        neutral=word_docs(100, seed=5),
        word=" w7",
        prompts=prompts,
        hook="blocks.2.hook_resid_post",
        data=[str(corpus)],
        tokens=3000,
        passes=2,
        d_sae=64,
        k=4,
        top=5,
        context_size=32,
    )
    result = run_diff_demo(cfg)
    assert result["probability"]["B"] > 3 * result["probability"]["A"]  # the edit planted it
    assert len(result["b_side"]) == 5 and result["b_side"][0]["relative_norm"] >= 0.5
    # among the three latents B writes most differently: the one that fires most on w20, and, added to A (what B
    # writes for it minus what A writes), it raises P(w7) after w20 above A's and above the shared latents'
    found = next(r for r in result["b_side"][:3] if r["strongest"].endswith("[[w20]]"))
    assert found["word_probability"] > 1.15 * max(result["probability"]["A"], result["control_median"])
    together = result["together"]  # the top three at once (here one carries the edit, two only dilute it)
    assert together["latents"] == [r["latent"] for r in result["b_side"][:3]]
    assert 0 < together["word_probability"] < 1 and 0 < together["control"] < 1
    again = run_diff_demo(cfg)  # every stage is done: nothing runs again but the measurements
    assert set(again["seconds"]) <= {"load model", "diff", "steer"}

    model = load_model(str(tmp_path / "A"))
    before = word_probability(model, prompts, 7)
    fine_tune(model, planted, DiffDemoConfig(tune_from=2, tune_steps=40, tune_lr=1e-2, context_size=32))
    assert word_probability(model, prompts, 7) > 5 * before


def check_viewer(run, sae, models, latent, report):
    """The viewer of a diff run: the overview's relative-norm histogram, a feature's norms, and its top examples
    as each model alone makes it fire (the latent read from A's activations in both places, then B's)."""
    from fastapi.testclient import TestClient

    from nanosae.interp.featuredb import FeatureDB
    from nanosae.viewer import create_app

    client = TestClient(create_app(run), base_url="http://localhost")
    overview = client.get("/api/overview").json()
    assert overview["diff"]["histogram"] == report["histogram"] and overview["diff"]["models"] == report["models"]
    page = client.get(f"/api/feature/{latent}").json()
    assert page["diff"]["relative_norm"] == report["relative_norm"][latent]
    sides = client.get(f"/api/feature/{latent}/sides").json()
    db = FeatureDB(run / "features.db")
    windows = [json.loads(e["ids"]) for e in db.examples(latent) if e["kind"] == "top"]
    assert len(sides["examples"]) == min(5, len(windows)) > 0
    hook = sae.cfg.hook_name
    for ids, got in zip(windows, sides["examples"]):
        tokens = torch.tensor([[models[0].tokenizer.bos_id, *[i for i in ids if i >= 0]]])
        x = [m.run_with_cache(tokens, [hook])[1][hook][0, 1:] for m in models]
        for side, pair in (("A", [x[0], x[0]]), ("B", [x[1], x[1]]), ("both", x)):
            want = sae.encode(torch.cat(pair, -1))[:, latent]
            assert torch.allclose(torch.tensor([v for v, i in zip(got[side], ids) if i >= 0]), want, atol=1e-3)
            assert all(v == 0 for v, i in zip(got[side], ids) if i < 0)
    assert sides["examples"][0]["A"] != sides["examples"][0]["B"]  # the two models differ at the last block
    assert client.get("/api/feature/9999/sides").status_code == 404
    check_pages(run, latent)


def check_pages(run, latent):
    """In chromium (where installed): the histogram's 50 bars and both models' rows under the top examples."""
    from pathlib import Path

    import uvicorn

    from nanosae.viewer import create_app
    from tests.viewer.test_browser import ARGS, CHROMIUM, open_page

    if not Path(CHROMIUM).exists():
        return
    from playwright.sync_api import sync_playwright

    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page, errors = open_page(browser, f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#diff-histogram rect", state="attached")
            assert page.locator("#diff-histogram rect").count() == 50
            page.goto(f"http://127.0.0.1:{port}/#/feature/{latent}")
            page.wait_for_selector("#sides .side-B .tok", state="attached")
            assert page.locator("#sides .side-A").count() == page.locator("#sides .side-B").count() > 0
            assert "relative decoder norm" in page.inner_text("#diff-line") and not errors
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=5)
