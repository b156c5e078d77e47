"""circuit-tracer's transcoder sets: files circuit-tracer itself wrote (tests/fixtures/circuit_tracer) load with
circuit-tracer's own outputs; nanosae's sets exported in that layout load back unchanged, trace to the same graph,
and (where circuit-tracer is installed) load in circuit-tracer with the same outputs; hostile sets fail in one line."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nanosae import SAE, SAEConfig
from nanosae.errors import NanosaeError
from nanosae.export.circuit_tracer import export_circuit_tracer, files
from nanosae.interp import circuits as C
from nanosae.rundir import TranscoderSetDir
from tests.conftest import mapped_from

FIXTURES = Path(__file__).parents[1] / "fixtures" / "circuit_tracer"
TOKENS = [0, 5, 9, 13, 22, 7]


def outputs(tset: C.TranscoderSet, x: torch.Tensor) -> torch.Tensor:
    """Every layer's replacement MLP output for inputs x (n_layers, n_pos, d_model)."""
    with torch.no_grad():
        latents = {L: tset[L].encode(x[L]) for L in tset}
        return torch.stack([tset.output(L, latents, x[L]) for L in tset])


@pytest.mark.parametrize("name", ["plt_relu", "plt_jumprelu_skip", "clt"])
def test_sets_circuit_tracer_wrote_give_its_outputs(name):
    expected = load_file(FIXTURES / "expected.safetensors")
    model, tset = C.load_transcoders(FIXTURES / name)
    assert model == "" and tset.layers == [0, 1, 2] and tset.cross_layer == (name == "clt")
    assert tset.hooks(1) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    want = expected["clt"] if name == "clt" else torch.stack([expected[f"{name}/{L}"] for L in range(3)])
    got = outputs(tset, expected["x"])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (got != 0).any() and tset[0].cfg.architecture == ("relu" if name == "plt_relu" else "jumprelu")


def trained_like(model, arch: str, cross_layer: bool = False, skip: bool = False) -> C.TranscoderSet:
    """A set of one architecture with every weight random and an activation scale that is not 1, so the export has
    scales to fold."""
    torch.manual_seed(3)
    tset = C.TranscoderSet({})
    for L in range(model.n_layers):
        read, write = C.mlp_hooks(L)
        cfg = SAEConfig(
            d_in=model.d_model,
            d_sae=40,
            architecture=arch,
            k=4 if arch in ("batchtopk", "topk") else None,
            hook_name=read,
            hook_name_out=write,
            d_out=model.d_model,
            skip_connection=skip,
            activation_scale=1.7,
            output_scale=0.6,
        )
        tc = SAE(cfg)
        with torch.no_grad():
            for name, p in tc.named_parameters():
                p.normal_(std={"threshold": 0.1, "W_skip": 0.02, "W_dec": 0.05, "b_dec": 0.05}.get(name, 0.3))
            if arch == "jumprelu":
                tc.threshold.abs_().add_(0.3)
            if arch == "batchtopk":
                tc.threshold.fill_(0.2)
        tset.by_layer[L] = tc.eval()
        if cross_layer and L < model.n_layers - 1:
            tset.later[L] = 0.2 * torch.randn(40, model.n_layers - 1 - L, model.d_model)
    return tset


def saved(tset: C.TranscoderSet, where: Path, model: str) -> Path:
    """The set as `train --transcoders` lays it out."""
    from nanosae.train.cross_layer import CROSS_FILE

    for L, tc in tset.items():
        tc.save(where / f"layer_{L}" / "sae")
        if L in tset.later:
            later = ",".join(str(j) for j in tset.layers if j > L)
            save_file({"W_dec_later": tset.later[L]}, where / f"layer_{L}" / CROSS_FILE, {"later_layers": later})
    TranscoderSetDir(where).write_manifest(model, tset.layers, tset.cross_layer)
    return where


@pytest.mark.parametrize(
    "arch,cross_layer,skip", [("relu", False, False), ("jumprelu", False, True), ("batchtopk", True, False)]
)
def test_an_exported_set_reads_back_with_the_same_outputs_and_graph(tiny_model, tmp_path, arch, cross_layer, skip):
    tset = trained_like(tiny_model, arch, cross_layer, skip)
    run = saved(tset, tmp_path / "set", "tiny-model")
    out = export_circuit_tracer(run, tmp_path / "ct", scan="Org/Tiny.Set")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_name"] == "tiny-model" and config["scan"] == "org-tiny-set"
    assert config["model_kind"] == ("cross_layer_transcoder" if cross_layer else "transcoder_set")
    model, back = C.load_transcoders(out)
    assert model == "tiny-model" and back.cross_layer == cross_layer
    _, original = C.load_transcoders(run)
    x = torch.randn(tiny_model.n_layers, 9, tiny_model.d_model) * 2
    assert torch.allclose(outputs(back, x), outputs(original, x), atol=1e-5)
    for L in back:  # the same features fire: the folded thresholds and biases are exact, not approximate
        assert torch.equal(back[L].encode(x[L]) > 0, original[L].encode(x[L]) > 0)
    g1 = C.attribute(tiny_model, original, TOKENS, batch_size=64)
    g2 = C.attribute(tiny_model, back, TOKENS, batch_size=64)
    assert torch.equal(g1.features, g2.features)
    scale = float(g1.adjacency.abs().max())  # float32 rounding through a deep sum, relative to the largest edge
    assert torch.allclose(g1.adjacency, g2.adjacency, atol=1e-4 * scale, rtol=1e-3)
    assert (g1.adjacency.abs() > 1e-2 * scale).sum() > 50  # a graph with real edges


def test_an_exported_set_runs_in_circuit_tracer_with_the_same_outputs(tiny_model, tmp_path):
    """circuit-tracer (in its own venv, benchmarks/circuit_tracer.py) loads the exported files with its own loaders."""
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    for cross_layer in (False, True):
        tset = trained_like(tiny_model, "jumprelu", cross_layer)
        out = export_circuit_tracer(saved(tset, tmp_path / f"s{cross_layer}", "m"), tmp_path / f"ct{cross_layer}")
        x = torch.randn(tiny_model.n_layers, 5, tiny_model.d_model)
        kw = {"device": torch.device("cpu"), "dtype": torch.float32, "lazy_encoder": False, "lazy_decoder": False}
        if cross_layer:
            theirs = load_clt(str(out), feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", **kw)(x)
        else:
            paths = {L: str(out / f"layer_{L}.safetensors") for L in tset}
            ct = load_transcoder_set(paths, "s", "mlp.hook_in", "mlp.hook_out", **kw)
            theirs = torch.stack([ct[L](x[L]) for L in tset])
        assert torch.allclose(theirs, outputs(tset, x), atol=1e-5)


def test_what_has_no_circuit_tracer_form_is_refused_in_one_line(tiny_model, tmp_path):
    topk = saved(trained_like(tiny_model, "topk"), tmp_path / "topk", "m")
    with pytest.raises(NanosaeError, match="topk transcoder has no exact form") as e:
        export_circuit_tracer(topk, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    partial = trained_like(tiny_model, "relu")
    del partial.by_layer[0]
    with pytest.raises(NanosaeError, match="every layer from 0"):
        files(partial)


def hostile(tmp_path, edit) -> Path:
    root = tmp_path / "set"
    shutil.copytree(FIXTURES / "plt_jumprelu_skip", root)
    edit(root)
    return root


def set_config(**changes):
    def edit(root):
        config = yaml.safe_load((root / "config.yaml").read_text()) | changes
        (root / "config.yaml").write_text(yaml.safe_dump(config))

    return edit


def replace_tensor(name, value):
    def edit(root):
        t = load_file(root / "layer_1.safetensors")
        t[name] = value(t[name]).contiguous()
        save_file(t, root / "layer_1.safetensors")

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (set_config(transcoders=["../outside.safetensors"]), "outside the set's directory"),
        (set_config(transcoders=["/etc/passwd"]), "outside the set's directory"),
        (set_config(model_kind="sae"), "model_kind must be one of"),
        (set_config(feature_input_hook="hook_resid_post"), "feature_input_hook 'hook_resid_post' is not one"),
        (lambda root: (root / "layer_1.safetensors").unlink(), "layer_1.safetensors is missing"),
        (lambda root: (root / "layer_2.safetensors").write_bytes(b"\x80junk"), "corrupt or truncated"),
        (lambda root: (root / "config.yaml").write_text("model_kind: [unclosed"), "not valid YAML"),
        (replace_tensor("W_dec", lambda w: w[:, :5]), "tensor W_dec has shape"),
        (replace_tensor("b_enc", lambda b: b * float("nan")), "NaN"),
    ],
)
def test_hostile_sets_fail_in_one_line_naming_the_file(tmp_path, edit, message):
    root = hostile(tmp_path, edit)
    with pytest.raises(NanosaeError, match=message) as e:
        C.load_transcoders(root)
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_a_hub_id_resolves_through_the_offline_cache(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out (models--ORG--NAME/snapshots/REV, refs/main)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-transcoders" / "snapshots" / ("a" * 40)
    shutil.copytree(FIXTURES / "plt_relu", snapshot / "relu")
    (cache / "models--org--tiny-transcoders" / "refs").mkdir()
    (cache / "models--org--tiny-transcoders" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tset = C.load_transcoders("hf:org/tiny-transcoders/relu")
    _, local = C.load_transcoders(FIXTURES / "plt_relu")
    x = torch.randn(3, 4, 32)
    assert torch.equal(outputs(tset, x), outputs(local, x))


def test_trace_and_export_from_the_command_line(tiny_llama_dir, tiny_model, tmp_path):
    import json

    from typer.testing import CliRunner

    from nanosae.cli import app

    runner = CliRunner()
    args = ["trace", "w5 w6 w7", "--transcoders", str(FIXTURES / "clt")]
    r = runner.invoke(app, args + ["--model", str(tiny_llama_dir)])
    assert r.exit_code != 0 and "give --out" in str(r.exception)
    r = runner.invoke(app, args + ["--out", str(tmp_path / "g.json")])
    assert r.exit_code != 0 and "names no model: give --model" in str(r.exception)
    r = runner.invoke(
        app, args + ["--model", str(tiny_llama_dir), "--out", str(tmp_path / "g.json"), "--scan", "Org/Tiny-2.0"]
    )
    assert r.exit_code == 0, r.output
    graph = json.loads((tmp_path / "g.json").read_text())
    assert graph["metadata"]["scan"] == "org-tiny-2-0" and graph["links"]
    assert not list(FIXTURES.glob("clt/graphs"))  # nothing written into the set
    chosen = args + ["--model", str(tiny_llama_dir), "--out", str(tmp_path / "t.json"), "--target", "w9"]
    r = runner.invoke(app, chosen + ["--versus", "w5 w6"])
    assert r.exit_code != 0 and "--versus 'w5 w6' is 2 tokens" in str(r.exception)
    r = runner.invoke(app, chosen + ["--versus", "w5"])
    assert r.exit_code == 0, r.output
    logit = next(n for n in json.loads((tmp_path / "t.json").read_text())["nodes"] if n["feature_type"] == "logit")
    assert "w9" in logit["clerp"] and 'minus "' in logit["clerp"]

    run = saved(trained_like(tiny_model, "batchtopk", cross_layer=True), tmp_path / "set", str(tiny_llama_dir))
    r = runner.invoke(app, ["export", "circuit-tracer", str(run), "--out", str(tmp_path / "ct")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["trace", "w5 w6 w7", "--transcoders", str(tmp_path / "ct"), "--out", str(tmp_path / "h.json")]
    )
    assert r.exit_code == 0, r.output  # the exported set names its model
    topk = saved(trained_like(tiny_model, "topk"), tmp_path / "topk", "m")
    r = runner.invoke(app, ["export", "circuit-tracer", str(topk), "--out", str(tmp_path / "ct2")])
    assert r.exit_code != 0 and "no exact form" in str(r.exception)


def test_a_traced_graph_prunes_again_without_tracing(tiny_llama_dir, tmp_path, monkeypatch):
    """The unpruned graph saved beside the file gives, at other thresholds, what tracing again would; nothing is
    traced (attribution is made to fail) and an existing file is not replaced."""
    import json

    from typer.testing import CliRunner

    from nanosae.cli import app

    runner = CliRunner()
    out = tmp_path / "g.json"
    base = ["trace", "w5 w6 w7", "--transcoders", str(FIXTURES / "plt_relu"), "--model", str(tiny_llama_dir)]
    assert runner.invoke(app, base + ["--out", str(out)]).exit_code == 0
    wide = tmp_path / "wide.json"
    assert runner.invoke(app, base + ["--out", str(wide), "--node-threshold", "0.95"]).exit_code == 0
    graph = C.load_graph(C.graph_tensors_path(out))
    again = C.load_graph(C.graph_tensors_path(wide))
    assert torch.equal(graph.adjacency, again.adjacency) and graph.info["n_layers"] == 3

    def refuse(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(C, "attribute", refuse)
    r = runner.invoke(app, ["prune", str(out), "--node-threshold", "0.95", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    pruned, traced = (json.loads((tmp_path / n).read_text()) for n in ("p.json", "wide.json"))
    assert {n["node_id"] for n in pruned["nodes"]} == {n["node_id"] for n in traced["nodes"]}
    assert pruned["links"] == traced["links"] and pruned["metadata"]["node_threshold"] == 0.95
    r = runner.invoke(app, ["prune", str(out), "--out", str(tmp_path / "p.json")])
    assert r.exit_code != 0 and "exists" in str(r.exception)
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    r = runner.invoke(app, ["prune", str(tmp_path / "bad.json"), "--out", str(tmp_path / "q.json")])
    assert r.exit_code != 0 and "not an unpruned graph" in str(r.exception)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_float32_weights_are_mapped_from_their_files_not_copied(tmp_path):
    """Each layer's file is mapped into the process and the loaded weights' memory lies inside that mapping."""
    root = tmp_path / "set"
    shutil.copytree(FIXTURES / "plt_relu", root)
    _, tset = C.load_transcoders(root)
    for L in tset:
        for name in ("W_enc", "W_dec", "b_enc"):
            assert mapped_from(getattr(tset[L], name), root / f"layer_{L}.safetensors"), f"layer {L}'s {name}"
    expected = load_file(FIXTURES / "expected.safetensors")
    torch.testing.assert_close(outputs(tset, expected["x"])[0], expected["plt_relu/0"], atol=1e-5, rtol=0)


def test_graphs_are_indexed_for_circuit_tracers_local_server(tiny_llama_dir, tmp_path):
    """graph-metadata.json beside the graphs lists each once (circuit-tracer's server reads it); with circuit-tracer
    installed, its own models accept the index entries and the graph file; the index is never taken for a graph."""
    import json

    from typer.testing import CliRunner

    from nanosae.cli import app
    from nanosae.rundir import GRAPH_INDEX

    base = ["trace", "w5 w6 w7", "--transcoders", str(FIXTURES / "plt_relu"), "--model", str(tiny_llama_dir)]
    for name in ("a", "b"):
        assert CliRunner().invoke(app, base + ["--out", str(tmp_path / f"{name}.json")]).exit_code == 0
    r = CliRunner().invoke(app, ["prune", str(tmp_path / "a.json"), "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / GRAPH_INDEX).read_text())["graphs"]
    assert [g["slug"] for g in index] == ["a", "b", "c"]
    assert index[0]["prompt"] == "w5 w6 w7" and index[0]["scan"] and index[0]["prompt_tokens"]
    assert TranscoderSetDir(tmp_path.parent / "x").graph("graph-metadata") != tmp_path / GRAPH_INDEX
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / GRAPH_INDEX).write_text("{}")
    (tmp_path / "graphs" / "one.json").write_text("{}")
    assert TranscoderSetDir(tmp_path).graph_names() == ["one"]
    assert TranscoderSetDir(tmp_path).new_graph("graph metadata")[0] == "graph-metadata-graph"
    for command in (base, ["prune", str(tmp_path / "a.json")]):  # a graph never takes the index's place
        r = CliRunner().invoke(app, command + ["--out", str(tmp_path / "graphs" / GRAPH_INDEX)])
        assert r.exit_code != 0 and "where the graphs' index goes" in str(r.exception)
    assert json.loads((tmp_path / "graphs" / GRAPH_INDEX).read_text()) == {}
    try:
        from circuit_tracer.frontend.graph_models import Metadata, Model
    except ImportError:
        return
    for entry in index:
        Metadata(**entry)
    Model(**json.loads((tmp_path / "a.json").read_text()))


def test_rank_tokens_keeps_no_more_features_and_errors(tiny_model):
    """Ranking the tokens with them raises the cut: they carry much of the influence."""
    graph = C.attribute(tiny_model, trained_like(tiny_model, "jumprelu"), TOKENS, batch_size=64)
    inner = slice(0, graph.token_index(0))
    for share in (0.5, 0.8):
        keep, _ = C.prune(graph, share, 0.98, rank_tokens=True)
        default, _ = C.prune(graph, share, 0.98)
        assert 0 < keep[inner].sum() < default[inner].sum() and keep[graph.token_index(0) :].all()


def test_rank_tokens_prunes_as_circuit_tracer_does(tiny_model):
    """--rank-tokens reproduces circuit-tracer's prune_graph (its own code, in its venv): the same nodes, edges
    and influence field."""
    pytest.importorskip("circuit_tracer")
    graph = C.attribute(tiny_model, trained_like(tiny_model, "jumprelu"), TOKENS, batch_size=64)
    assert graph.explored.all()  # circuit-tracer traces every feature it keeps
    inner = slice(0, graph.token_index(0))
    from types import SimpleNamespace

    from circuit_tracer.graph import prune_graph

    theirs = SimpleNamespace(
        input_tokens=torch.tensor(TOKENS),
        logit_targets=graph.logit_tokens,
        selected_features=torch.arange(graph.n_features),
        adjacency_matrix=graph.adjacency,
        logit_probabilities=torch.tensor(graph.logit_probs),
    )
    for share, edge_share in ((0.5, 0.9), (0.8, 0.98)):
        node_mask, edge_mask, cumulative = prune_graph(theirs, share, edge_share)
        keep, edges = C.prune(graph, share, edge_share, rank_tokens=True)
        assert torch.equal(keep, node_mask) and 5 < int(keep[inner].sum()) < graph.token_index(0)
        assert torch.equal(edges, edge_mask & (graph.adjacency != 0))
        assert torch.allclose(C.cumulative_influence(graph, rank_tokens=True), cumulative, atol=1e-6)
