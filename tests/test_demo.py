"""Integration: `nanosae demo --quick` end to end on the real embedded model and text."""

import json
import re
import sqlite3

import pytest
from typer.testing import CliRunner

from nanosae.cli import app

pytestmark = pytest.mark.integration


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for artifact in (
        "acts/blocks.15.hook_resid_post/manifest.json",
        "sae/cfg.json",
        "sae/sae_weights.safetensors",
        "metrics.jsonl",
        "eval.json",
        "report.html",
        "features.db",
    ):
        assert (out / artifact).exists(), artifact
    m = json.loads((out / "eval.json").read_text())
    assert 0 < m["fvu"] < 0.6 and 0 < m["l0"] <= 32 and m["dead_fraction"] < 0.5
    assert 0.3 < m["ce_loss_score"] <= 1.0 and m["ce_loss_clean"] < m["ce_loss_with_sae"] < m["ce_loss_with_ablation"]
    n = (
        sqlite3.connect(out / "features.db")
        .execute("SELECT COUNT(*) FROM latents WHERE explanation IS NOT NULL")
        .fetchone()[0]
    )
    assert n > 100
    assert "five interesting features" in r.output and "nanosae view" in r.output and "steering" in r.output
    from nanosae.demo import interesting_features
    from nanosae.interp.featuredb import FeatureDB

    feats = interesting_features(FeatureDB(out), 5)
    assert feats and len({f["explanation"] for f in feats}) == len(feats)
    from nanosae.demo import leading_token

    assert len({leading_token(f["explanation"]) for f in feats}) == len(feats)  # one feature per leading token
    assert leading_token('" Self" | "self" "["') == "self" and leading_token('"0" | " __ name"') == "0"
    assert all(f["fires"] >= 50 and re.search(r"[A-Za-z]{3}", f["explanation"]) and f["density"] <= 0.05 for f in feats)
    # every feature with enough firings was read from the whole store, and the steering effect is measured
    assert (
        sqlite3.connect(out / "features.db").execute("SELECT value FROM meta WHERE key = 'tokens'").fetchone()[0]
        == "24576"
    )
    before, after = map(
        float, re.search(r"fires on .*:\s+([0-9.e+-]+)\s+->\s+([0-9.e+-]+)", r.output.replace("\n", " ")).groups()
    )
    assert after > before
    # the evaluations beyond reconstruction, from Python, on the real model (smaller than the defaults)
    from nanosae import SAE
    from nanosae.eval.absorption import AbsorptionConfig, absorption
    from nanosae.eval.probing import ProbingConfig, sparse_probing
    from nanosae.models import load_model

    model, sae = load_model("smollm2-135m"), SAE.load(out / "sae")
    absorbed = absorption(sae, model, AbsorptionConfig(max_words=800))
    assert absorbed["words"] > 700 and absorbed["letters_scored"] >= 15
    assert 0 <= absorbed["mean_full_absorption_score"] <= 1 and 0 <= absorbed["mean_absorption_fraction_score"] <= 1
    probed = sparse_probing(sae, model, ProbingConfig(windows=16, per_class=150))
    assert probed["tasks"] >= 6 and probed["details"]["keyword"]["llm_test_accuracy"] > 0.85
    assert probed["llm_test_accuracy"] >= probed["sae_top_1_test_accuracy"] - 0.1


def test_circuits_demo_stages_on_a_tiny_model(tiny_llama_dir, word_corpus, tmp_path):
    """Every stage of `nanosae demo --circuits` (the real one is measured in docs: ~15 minutes), on the tiny
    model: a transcoder per layer, replacement scores, a feature database per layer, the traced graph; a second
    call finds everything done."""
    from nanosae.demo import CircuitsDemoConfig, run_circuits_demo

    cfg = CircuitsDemoConfig(
        out=str(tmp_path / "c"),
        model=str(tiny_llama_dir),
        data=[str(word_corpus)],
        prompt="w5 w6 w7 w8 w9",
        tokens=2000,
        d_sae=32,
        k=4,
        batch_size=250,
        feature_tokens=300,
        max_feature_nodes=20,
        context_size=16,
    )
    result = run_circuits_demo(cfg)
    out = tmp_path / "c"
    assert json.loads((out / "transcoders.json").read_text())["layers"] == {str(L): f"layer_{L}" for L in range(3)}
    assert all((out / f"layer_{L}" / "features.db").exists() for L in range(3))
    graph = json.loads((out / "graphs" / "demo.json").read_text())
    assert graph["metadata"]["prompt"] == "w5 w6 w7 w8 w9" and graph["links"]
    assert 0 <= result["info"]["replacement_score"] <= 1 and result["top_logits"]
    again = run_circuits_demo(cfg)
    assert set(again["seconds"]) <= {"load model", "features"}  # nothing recomputed
