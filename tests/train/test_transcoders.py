"""Training, evaluating and inspecting transcoders and crosscoders on a tiny model."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import nanosae
from nanosae import SAE, DataConfig, TrainConfig
from nanosae.cli import app
from nanosae.eval import evaluate
from nanosae.interp.featuredb import open_db
from nanosae.interp.features import FeaturesConfig, build_features
from nanosae.interp.live import Edit, FeatureTracker, steering

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
N_PLANTED = 48


class PlantedMLP(nn.Module):
    """A linear-sparse MLP: relu(x E^T + b) with thresholds that keep each feature rare, then D."""

    def __init__(self, E: torch.Tensor, b: torch.Tensor, D: torch.Tensor):
        super().__init__()
        self.up = nn.Linear(E.shape[1], E.shape[0])
        self.down_proj = nn.Linear(E.shape[0], D.shape[0], bias=False)
        with torch.no_grad():
            self.up.weight.copy_(E)
            self.up.bias.copy_(b)
            self.down_proj.weight.copy_(D)

    def forward(self, x):
        return self.down_proj(self.up(x).relu())


@pytest.fixture(scope="module")
def planted_model(tiny_llama_dir, word_corpus):
    """The tiny Llama with block 1's MLP replaced by a planted linear-sparse map (about 3 features per token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanosae.models.hf import HFModel

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = HFModel(hf, AutoTokenizer.from_pretrained(tiny_llama_dir), "planted")
    g = torch.Generator().manual_seed(7)
    E = torch.randn(N_PLANTED, 32, generator=g)
    E /= E.norm(dim=1, keepdim=True)
    D = torch.randn(32, N_PLANTED, generator=g)
    D *= 2.0 / D.norm(dim=0, keepdim=True)  # unit-ish output directions, large enough to matter for the logits
    # thresholds at each feature's 94th percentile on the real inputs: ~6% firing, ~3 features per token
    data = DataConfig(specs=[str(word_corpus)], context_size=32, split="all")
    from nanosae.data.stream import ActivationStream

    x = torch.cat(list(ActivationStream(model, IN, data).activations()))
    b = -torch.quantile(x @ E.T, 0.94, dim=0)
    hf.model.layers[1].mlp = PlantedMLP(E, b, D)
    with torch.no_grad():  # a random model's logits are nearly uniform; sharpen them so the MLP matters for CE
        hf.lm_head.weight.mul_(100)
    model = HFModel(hf, AutoTokenizer.from_pretrained(tiny_llama_dir), "planted")
    return model, D.T.contiguous(), data


def test_transcoder_recovers_a_planted_sparse_mlp(planted_model, tmp_path):
    model, D, data = planted_model
    stream = nanosae.data.ActivationStream(model, [IN, OUT], data, buffer_tokens=8192)
    cfg = TrainConfig.build(
        out=str(tmp_path / "tc"),
        hook=IN,
        hook_out=OUT,
        architecture="topk",
        d_sae=192,
        k=4,
        tokens=400_000,
        batch_size=1024,
        lr=1e-2,
        data=data,
        checkpoint_every=0,
        log_every=50,
    )
    from nanosae.train.trainer import SAERun, batch_stream

    run = SAERun(cfg, [stream], [(0, stream.columns(IN))], [(0, stream.columns(OUT))], 0, 1)
    batches = batch_stream(stream, cfg, 0)
    while not run.done:
        batch = next(batches)
        if len(batch) == cfg.optim.batch_size:
            run.train_step([batch])
    sae = run.finish().sae
    assert sae.cfg.kind == "transcoder" and (sae.cfg.hook_name, sae.cfg.hook_name_out) == (IN, OUT)
    # most planted output directions are found as decoder rows
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best = (W @ (D / D.norm(dim=1, keepdim=True)).T).max(dim=0).values
    assert float((best > 0.9).float().mean()) > 0.8, best
    # the transcoder replaces the MLP: the output is reconstructed and the model keeps most of its loss
    result = evaluate(sae, model, data, tokens=1500, batch_size=8)
    assert result["kind"] == "transcoder" and result["hook_out"] == OUT
    assert result["fvu"] < 0.1, result["fvu"]
    assert result["ce_loss_with_ablation"] > result["ce_loss_clean"] + 0.05  # the planted MLP matters
    assert result["ce_loss_score"] > 0.9, result["ce_loss_score"]


def test_transcoder_and_crosscoder_through_the_cli(tiny_llama_dir, tiny_model, word_corpus, tmp_path):
    """Collect stores, train a skip transcoder from stores and a crosscoder streamed, evaluate, features, steer."""
    runner = CliRunner()
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acts = tmp_path / "acts"
    r = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(tiny_llama_dir),
            "--hook",
            IN,
            "--hook",
            OUT,
            "--data",
            str(word_corpus),
            "--split",
            "all",
            "--tokens",
            "2k",
            "--out",
            str(acts),
            "--context-size",
            "16",
            "--dtype",
            "float32",
            "--tokens-per-shard",
            "512",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "train",
            "--acts",
            str(acts / IN),
            "--acts-out",
            str(acts / OUT),
            "--skip-connection",
            "--arch",
            "relu",
            "--d-sae",
            "64",
            "--tokens",
            "8k",
            "--batch-size",
            "256",
            "--out",
            str(tmp_path / "tc"),
        ],
    )
    assert r.exit_code == 0, r.output
    tc = SAE.load(tmp_path / "tc" / "sae")
    assert (tc.cfg.kind, tc.cfg.skip_connection, tc.cfg.hook_name_out, tc.cfg.output_scale is not None) == (
        "transcoder",
        True,
        OUT,
        True,
    )
    cross_args = [
        "train",
        "--crosscoder",
        "--model",
        str(tiny_llama_dir),
        "--data",
        str(word_corpus),
        "--context-size",
        "16",
        "--arch",
        "topk",
        "--d-sae",
        "64",
        "--k",
        "4",
        "--tokens",
        "4k",
        "--batch-size",
        "256",
        "--out",
        str(tmp_path / "cc"),
    ]
    for h in hooks:
        cross_args += ["--hook", h]
    r = runner.invoke(app, cross_args)
    assert r.exit_code == 0, r.output
    cc = SAE.load(tmp_path / "cc" / "sae")
    assert cc.cfg.kind == "crosscoder" and cc.cfg.crosscoder_hooks == hooks and cc.cfg.d_in == 64
    assert isinstance(cc.cfg.activation_scale, list) and len(cc.cfg.activation_scale) == 2
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert config["source"]["crosscoder_hooks"] == hooks

    for run in ("tc", "cc"):
        r = runner.invoke(
            app,
            [
                "eval",
                str(tmp_path / run),
                "--model",
                str(tiny_llama_dir),
                "--data",
                str(word_corpus),
                "--tokens",
                "200",
                "--context-size",
                "16",
            ],
        )
        assert r.exit_code == 0, r.output
        result = json.loads((tmp_path / run / "eval.json").read_text())
        assert result["kind"] == ("transcoder" if run == "tc" else "crosscoder") and 0 <= result["fvu"] < 2
    assert len(json.loads((tmp_path / "cc" / "eval.json").read_text())["fvu_by_layer"]) == 2

    # feature database, tracking and steering read the crosscoder's two layers
    db = build_features(
        cc,
        tiny_model,
        FeaturesConfig(data=DataConfig(specs=[str(word_corpus)], context_size=16), tokens=300, batch_size=4),
        tmp_path / "cc" / "features.db",
    )
    meta = {r["key"]: json.loads(r["value"]) for r in open_db(db).execute("SELECT key, value FROM meta")}
    assert meta["kind"] == "crosscoder" and meta["hook"] == ",".join(hooks)
    assert open_db(db).execute("SELECT SUM(fires) FROM latents").fetchone()[0] > 0
    tracker = FeatureTracker(tiny_model, {"cc": cc, "tc": tc}, top_k=3)
    tracker.generate("w5 w6 w7", max_new_tokens=3)
    assert len(tracker.history) == 3 and any(t.features for t in tracker.history)
    with pytest.raises(nanosae.ConfigError, match="cannot be clamped"):
        with steering(tiny_model, cc, [Edit(0, 1.0, "clamp")]):
            pass

    # the viewer serves the crosscoder's run: overview, live text and steering (add)
    from fastapi.testclient import TestClient

    from nanosae.viewer import create_app

    client = TestClient(create_app(tmp_path / "cc", model=str(tiny_llama_dir)), base_url="http://localhost")
    assert client.get("/api/overview").json()["meta"]["kind"] == "crosscoder"
    tokens = client.post("/api/run_text", json={"text": "w5 w6 w7", "top_k": 3}).json()["tokens"]
    assert len(tokens) == 3 and any(t["features"] for t in tokens)
    r = client.post(
        "/api/steer",
        json={"prompt": "w5 w6", "edits": [{"latent": 1, "value": 50.0, "mode": "add"}], "max_new_tokens": 4},
    )
    assert r.status_code == 200, r.text


def test_transcoder_clamp_edits_the_mlp_output(tiny_model):
    """Clamping a transcoder latent adds (v − z_i)·W_dec[i] to the MLP output, computed from the MLP's input."""
    torch.manual_seed(0)
    tc = SAE(nanosae.SAEConfig(d_in=32, d_sae=16, d_out=32, architecture="relu", hook_name=IN, hook_name_out=OUT))
    tokens = torch.tensor([[0, 5, 9, 13, 22, 7]])
    _, clean = tiny_model.run_with_cache(tokens, [IN, OUT])
    z = tc.encode(clean[IN])
    with torch.no_grad(), steering(tiny_model, tc, [Edit(3, 2.5, "clamp")]):
        _, edited = tiny_model.run_with_cache(tokens, [OUT])
    expected = clean[OUT] + (2.5 - z[..., 3:4]) * tc.W_dec[3].detach()
    assert torch.allclose(edited[OUT], expected, atol=1e-5)


def test_transcoder_resume_from_stores_is_exact(tmp_path):
    """A transcoder resumed from a mid-run checkpoint ends with the uninterrupted run's weights (bit for bit)."""
    import shutil

    from nanosae.data import write_store
    from nanosae.train import train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g) * 3
    y = (x @ torch.randn(8, 16, generator=g) - 1).relu() @ torch.randn(16, 6, generator=g)
    acts_in = write_store(
        tmp_path / "in", x, hook="blocks.0.ln2.hook_normalized", model="synthetic", tokens_per_shard=1024
    )
    acts_out = write_store(tmp_path / "out", y, hook="blocks.0.hook_mlp_out", model="synthetic", tokens_per_shard=1024)
    cfg = dict(
        acts=str(acts_in.path),
        acts_out=str(acts_out.path),
        architecture="relu",
        skip_connection=True,
        d_sae=32,
        tokens=8192,
        batch_size=256,
        checkpoint_every=8,
        lr=3e-3,
        resample_every=10,
    )
    full = train(TrainConfig.build(out=str(tmp_path / "full"), **cfg))
    assert full.sae.cfg.kind == "transcoder" and full.sae.cfg.d_out == 6 and full.sae.cfg.output_scale != 1.0
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "resumed" / "checkpoints").glob("step_*"))
    assert steps == [24, 32]  # the newest two are kept
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_32")  # as if killed after step 24
    shutil.rmtree(tmp_path / "resumed" / "sae")
    resumed = train(TrainConfig.build(out=str(tmp_path / "resumed"), resume=True, **cfg))
    for name, value in full.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
