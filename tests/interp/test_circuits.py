"""Attribution graphs: the replacement model is exact with its error nodes, every edge equals the Jacobian of an
independently written frozen replacement model, pruning keeps what it promises, and the graph file has
Neuronpedia's layout."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from nanosae import SAE, SAEConfig
from nanosae.config import InterveneConfig
from nanosae.errors import ConfigError
from nanosae.interp import circuits as C

TOKENS = [0, 5, 9, 13, 22, 7, 41]


def random_transcoders(model, d_sae=48, k=4, skip=False, cross_layer=False):
    """Random TopK transcoders at every layer; cross_layer: with decoders to every later layer too."""
    torch.manual_seed(1)
    tcs = C.TranscoderSet({})
    for layer in range(model.n_layers):
        read, write = C.mlp_hooks(layer)
        tc = SAE(
            SAEConfig(
                d_in=model.d_model,
                d_sae=d_sae,
                architecture="topk",
                k=k,
                hook_name=read,
                hook_name_out=write,
                d_out=model.d_model,
                skip_connection=skip,
            )
        )
        with torch.no_grad():
            tc.W_dec.mul_(0.3)
            tc.b_enc.normal_(std=0.1)
            if skip:
                tc.W_skip.normal_(std=0.05)
        tcs.by_layer[layer] = tc.eval()
        if cross_layer and layer < model.n_layers - 1:
            tcs.later[layer] = 0.2 * torch.randn(d_sae, model.n_layers - 1 - layer, model.d_model)
    return tcs


def cross_layer_output(tcs, L, lat, x):
    """Layer L's replacement MLP output written out densely: its own transcoder's output plus every earlier
    layer's latents times its decoder to L, in L's output units."""
    out = tcs[L].decode(lat[L]) + C.skip_term(tcs[L], x)
    for i in tcs.later:
        if i < L:
            out = out + lat[i] @ tcs.later[i][:, L - i - 1] / tcs[L].output_factor()
    return out


@pytest.mark.parametrize("skip,cross_layer", [(False, False), (True, False), (False, True)])
def test_replacement_model_with_error_nodes_equals_the_model(tiny_model, skip, cross_layer):
    tcs = random_transcoders(tiny_model, skip=skip, cross_layer=cross_layer)
    clean = C.clean_pass(tiny_model, tcs, torch.tensor([TOKENS]))
    with torch.no_grad():
        logits = C.replacement_forward(
            tiny_model,
            tcs,
            clean.tokens,
            clean.embeddings[None],
            {L: z[None] for L, z in clean.latents.items()},
            {L: e[None] for L, e in clean.errors.items()},
        )
        plain = tiny_model.forward(torch.tensor([TOKENS]))
    assert torch.allclose(logits, plain, atol=2e-4)  # float32 rounding of y = (transcoder + error)
    assert any(e.abs().max() > 0.1 for e in clean.errors.values())  # the transcoders really differ from the MLPs
    with torch.no_grad():  # without the error nodes it is another model
        bare = C.replacement_forward(
            tiny_model,
            tcs,
            clean.tokens,
            clean.embeddings[None],
            {L: z[None] for L, z in clean.latents.items()},
            {L: torch.zeros_like(e)[None] for L, e in clean.errors.items()},
        )
    assert not torch.allclose(bare, plain, atol=1e-3)


def manual_frozen_llama(hf, tcs, clean):
    """The frozen replacement model of a Llama written out by hand from its weights: norm scales and attention
    patterns computed once from the clean pass, MLPs replaced by transcoder outputs plus errors. Returns
    f(embeddings, latents..., errors...) -> (every layer's MLP input, logits)."""
    T = clean.tokens.shape[1]
    pos = torch.arange(T)[None]
    layers = hf.model.layers

    def rms_scale(h, eps):
        return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    def attention(layer, normed, pattern=None):
        a = layer.self_attn
        hd = a.head_dim
        q = a.q_proj(normed).view(1, T, -1, hd).transpose(1, 2)
        k = a.k_proj(normed).view(1, T, -1, hd).transpose(1, 2)
        v = a.v_proj(normed).view(1, T, -1, hd).transpose(1, 2)
        reps = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1)
        if pattern is None:
            cos, sin = hf.model.rotary_emb(normed, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            scores = q @ k.transpose(-1, -2) * a.scaling
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            pattern = scores.softmax(-1)
        return a.o_proj((pattern @ v).transpose(1, 2).reshape(1, T, -1)), pattern

    # the frozen constants, from a plain pass
    frozen, h = [], clean.embeddings[None]
    with torch.no_grad():
        for _, layer in enumerate(layers):
            r1 = rms_scale(h, layer.input_layernorm.variance_epsilon)
            att, pattern = attention(layer, layer.input_layernorm.weight * h * r1)
            mid = h + att
            r2 = rms_scale(mid, layer.post_attention_layernorm.variance_epsilon)
            frozen.append((r1, pattern, r2))
            h = mid + layer.mlp(layer.post_attention_layernorm.weight * mid * r2)
        rf = rms_scale(h, hf.model.norm.variance_epsilon)

    def f(emb, *lat_err):
        lat, err = lat_err[: len(layers)], lat_err[len(layers) :]
        h, inputs = emb[None], []
        for L, layer in enumerate(layers):
            r1, pattern, r2 = frozen[L]
            h = h + attention(layer, layer.input_layernorm.weight * h * r1, pattern)[0]
            x = layer.post_attention_layernorm.weight * h * r2
            inputs.append(x[0])
            h = h + cross_layer_output(tcs, L, [z[None] for z in lat], x) + err[L][None]
        return inputs, hf.lm_head(hf.model.norm.weight * h * rf)[0]

    return f


@pytest.fixture(params=["linear", "autograd"])
def backward(request, monkeypatch):
    """Both ways a trace computes its rows on a Llama: the backward written out (LinearPass), and autograd
    through the model's own modules (FrozenPass, what every other model gets)."""
    if request.param == "autograd":
        monkeypatch.setattr(C.LinearPass, "supports", staticmethod(lambda model, transcoders: False))
    return request.param


@pytest.mark.parametrize(
    "skip,skip_bos,cross_layer", [(False, True, False), (True, True, False), (False, False, False), (True, True, True)]
)
def test_every_edge_is_the_jacobian_of_the_frozen_replacement_model(tiny_model, skip, skip_bos, cross_layer, backward):
    """(skip: transcoders with a skip connection; skip_bos: the BOS position's features are constants, not nodes;
    cross_layer: every layer's features also write to every later MLP.)"""
    tcs = random_transcoders(tiny_model, skip=skip, cross_layer=cross_layer)
    assert C.LinearPass.supports(tiny_model, tcs) == (backward == "linear")
    graph = C.attribute(tiny_model, tcs, TOKENS, batch_size=16, skip_bos_features=skip_bos)
    assert (graph.features[:, 1] == 0).any() != skip_bos
    clean = C.clean_pass(tiny_model, tcs, torch.tensor([TOKENS]))
    f = manual_frozen_llama(tiny_model.module, tcs, clean)
    sources = (clean.embeddings, *[clean.latents[L] for L in graph.layers], *[clean.errors[L] for L in graph.layers])
    _, logits = f(*sources)
    assert torch.allclose(logits, clean.logits, atol=2e-4)  # the hand-written model is the model (float32)

    assert_edges_are_the_jacobian(graph, clean, f, tcs)


def assert_edges_are_the_jacobian(graph, clean, f, tcs):
    """Every edge (into features and logits) equals the Jacobian entry of f(embeddings, latents..., errors...)
    -> (MLP inputs, logits) times the source's value; nothing reaches a feature from a later position or from
    its own layer or above."""
    layers = graph.layers
    sources = (clean.embeddings, *[clean.latents[L] for L in layers], *[clean.errors[L] for L in layers])

    def targets(*src):
        inputs, logits = f(*src)
        feats = [tcs[L].pre_acts(tcs[L].normalize_input(inputs[L][p])[0])[i] for L, p, i in graph.features.tolist()]
        last = logits[-1]
        return torch.stack(feats + [last[t] - last.mean() for t in graph.logit_tokens])

    J = torch.autograd.functional.jacobian(targets, sources)  # one (n_targets, *source shape) block per source
    n_f, T = graph.n_features, graph.n_pos
    expected = torch.zeros(n_f + len(graph.logit_tokens), graph.adjacency.shape[1])
    for col, (L, p, i) in enumerate(graph.features.tolist()):
        expected[:, col] = J[1 + layers.index(L)][:, p, i] * graph.activations[col]
    for li, L in enumerate(layers):
        expected[:, graph.error_index(L, 0) : graph.error_index(L, 0) + T] = (
            J[1 + len(layers) + li] * clean.errors[L]
        ).sum(-1)
        if graph.info["generation_settings"]["skip_bos_features"]:  # BOS error nodes: constants, no edges
            expected[:, graph.error_index(L, 0)] = 0
    expected[:, graph.token_index(0) : graph.token_index(0) + T] = (J[0] * clean.embeddings).sum(-1)
    rows = list(range(n_f)) + [graph.logit_index(i) for i in range(len(graph.logit_tokens))]
    got = graph.adjacency[rows]
    assert graph.explored[rows].all()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-3), (got - expected).abs().max()
    assert (got[:n_f].abs() > 1e-3).sum() > 20  # a graph with real edges, not a zero matrix matching zeros
    for col, (L, p, _) in enumerate(graph.features.tolist()):
        later = (graph.features[:, 1] > p) | (graph.features[:, 0] >= L)
        assert not got[col, :n_f][later].any()


def test_logit_targets_cover_the_probability_asked_for():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]).log_softmax(-1)
    ids, probs = C.top_logits(logits, probability=0.7, at_most=10)
    assert ids[0] == 0 and sum(probs) >= 0.7 and sum(probs) - probs[-1] < 0.7
    assert C.top_logits(logits, probability=0.999, at_most=2)[0] == [0, 1]


NODE_FIELDS = {
    "node_id": str,
    "feature": int,
    "layer": str,
    "ctx_idx": int,
    "feature_type": str,
    "jsNodeId": str,
    "token_prob": float,
    "is_target_logit": bool,
    "run_idx": int,
    "reverse_ctx_idx": int,
    "clerp": str,
    "influence": float,
}
FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def test_pruning_keeps_the_share_of_influence_asked_for(tiny_model):
    graph = C.attribute(tiny_model, random_transcoders(tiny_model), TOKENS)
    influence = C.node_influence(graph.adjacency, C.logit_weights(graph))
    inner = slice(0, graph.token_index(0))
    total = float(influence[inner].sum())
    kept = {}
    for share in (0.5, 0.8, 0.95):
        keep, edges = C.prune(graph, node_share=share, edge_share=1.0)
        kept[share] = int(keep[inner].sum())
        assert float(influence[inner][keep[inner]].sum()) >= share * total - 1e-6
        assert keep[graph.token_index(0) :].all()  # tokens and logits always stay
        assert not edges[~keep].any() and not edges[:, ~keep].any()
    assert kept[0.5] < kept[0.8] < kept[0.95]
    _, fewer_edges = C.prune(graph, node_share=0.8, edge_share=0.5)
    assert fewer_edges.sum() < C.prune(graph, node_share=0.8, edge_share=0.99)[1].sum()


def test_graph_json_has_neuronpedias_layout(tiny_model):
    graph = C.attribute(tiny_model, random_transcoders(tiny_model), TOKENS)
    data = C.to_neuronpedia(graph, slug="tiny", labels={(0, 3): "a label"})
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "tiny" and meta["prompt_tokens"] == graph.token_strs and meta["schema_version"] == 1
    # the required fields and types of Neuronpedia's graph schema (apps/webapp/app/api/graph/graph-schema.json)
    assert all(isinstance(meta[k], str) for k in ("slug", "scan", "prompt"))
    assert all(isinstance(t, str) for t in meta["prompt_tokens"]) and isinstance(meta["node_threshold"], float)
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    gen = meta["generation_settings"]
    assert isinstance(gen["max_n_logits"], int) and isinstance(gen["desired_logit_prob"], float)
    assert isinstance(gen["batch_size"], int) and gen["max_feature_nodes"] == graph.n_features
    assert meta["info"]["generator"]["name"] == "nanosae" and isinstance(meta["info"]["generator"]["version"], str)
    assert 0 <= meta["info"]["replacement_score"] <= 1 and 0 <= meta["info"]["completeness_score"] <= 1
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    for node in data["nodes"]:
        for key, kind in NODE_FIELDS.items():
            assert isinstance(node[key], kind), (key, node)
        assert node["feature_type"] in FEATURE_TYPES
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert all(
        link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float) for link in data["links"]
    )
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, pos = map(int, feature["node_id"].split("_"))
    assert feature["feature"] == C.cantor(layer, latent) and feature["ctx_idx"] == pos
    paths = C.strongest_paths(data, n=3)
    assert paths and paths[0][0] >= paths[-1][0]
    for score, path in paths:
        assert path[0]["feature_type"] == "embedding" and path[-1]["is_target_logit"] and score > 0
        links = {(link["source"], link["target"]) for link in data["links"]}
        assert all((a["node_id"], b["node_id"]) in links for a, b in zip(path, path[1:]))
    assert len({path[0]["node_id"] for _, path in paths}) == len(paths)  # one path per token


def test_strongest_paths_against_every_path_enumerated(tiny_model):
    """Each token's best path is the one of all its paths (enumerated here) with the largest effect: its first edge
    times each later edge over its source feature's activation (the chain rule in the frozen model, where a
    feature's activation moves with its pre-activation one for one); tokens rank by it."""
    data = C.to_neuronpedia(C.attribute(tiny_model, random_transcoders(tiny_model), TOKENS), node_share=0.9)
    activation = {n["node_id"]: n.get("activation") for n in data["nodes"]}
    out = {}
    for link in data["links"]:
        out.setdefault(link["source"], []).append((link["target"], abs(link["weight"])))
    target = next(n["node_id"] for n in data["nodes"] if n["is_target_logit"])

    def all_paths(node, first=True):
        if node == target:
            yield 1.0, [node]
        for t, w in out.get(node, []):
            for score, rest in all_paths(t, first=False):
                yield w / (1.0 if first else abs(activation[node])) * score, [node] + rest

    best = {}
    for n in data["nodes"]:
        if n["feature_type"] == "embedding":
            found = list(all_paths(n["node_id"]))
            if found:
                best[n["node_id"]] = max(found, key=lambda p: p[0])
    paths = C.strongest_paths(data, n=len(best))
    assert len(paths) == len(best) >= 3
    assert [p[0] for p in paths] == pytest.approx(sorted((b[0] for b in best.values()), reverse=True))
    for score, path in paths:
        assert score == pytest.approx(best[path[0]["node_id"]][0])
        assert [n["node_id"] for n in path] == best[path[0]["node_id"]][1]


def test_tracing_fewer_features_keeps_their_edges_and_picks_influential_ones(tiny_model):
    tcs = random_transcoders(tiny_model)
    full = C.attribute(tiny_model, tcs, TOKENS)
    part = C.attribute(tiny_model, tcs, TOKENS, max_feature_nodes=10, batch_size=4)
    assert part.n_features == 10 < full.n_features
    index = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    kept = [index[tuple(f)] for f in part.features.tolist()]
    cols = kept + list(range(full.n_features, full.adjacency.shape[0]))  # its features, errors, tokens, logits
    rows = kept + [full.logit_index(i) for i in range(len(full.logit_tokens))]
    part_rows = list(range(10)) + [part.logit_index(i) for i in range(len(part.logit_tokens))]
    assert torch.allclose(part.adjacency[part_rows][:, : len(cols)], full.adjacency[rows][:, cols], atol=1e-6)
    influence = C.node_influence(full.adjacency, C.logit_weights(full))[: full.n_features]
    top = set(influence.argsort(descending=True)[:10].tolist())
    assert len(top & set(kept)) >= 6  # chosen by influence estimated from partial rows: mostly the true top ten


def test_replacement_scores_against_direct_computations(tiny_model, word_corpus):
    import torch.nn.functional as F

    from nanosae import DataConfig
    from nanosae.data import iter_documents, token_batches

    data = DataConfig(specs=[str(word_corpus)], context_size=16, split="eval")
    tcs = random_transcoders(tiny_model)
    zero = random_transcoders(tiny_model)
    with torch.no_grad():
        for tc in zero.by_layer.values():
            tc.W_dec.zero_()
            tc.b_dec.zero_()
    batch = next(token_batches(iter_documents(data), tiny_model.tokenizer, 16, 8))
    n = int(batch.valid.sum())
    r = C.replacement_scores(tiny_model, tcs, data, tokens=n, batch_size=8)
    z = C.replacement_scores(tiny_model, zero, data, tokens=n, batch_size=8)
    keep = batch.valid[:, :-1] & batch.valid[:, 1:]
    logits = tiny_model.forward(batch.tokens)
    direct = F.cross_entropy(logits[:, :-1][keep], batch.tokens[:, 1:][keep])
    assert r["tokens"] == n and r["ce_loss_clean"] == pytest.approx(float(direct), rel=1e-5)
    assert z["ce_loss_replaced"] == pytest.approx(z["ce_loss_mlps_zeroed"], rel=1e-6)  # zero transcoders = zeroed MLPs
    assert z["replacement_ce_score"] == pytest.approx(0.0, abs=1e-5)
    assert all(v >= 1.0 for v in z["fvu_by_layer"].values())  # predicting 0: error = Σy² >= variance
    assert r["ce_loss_replaced"] != pytest.approx(r["ce_loss_clean"])


def test_cross_layer_replacement_scores_against_a_hand_written_replacement(tiny_model, word_corpus):
    """Every MLP replaced by the dense cross-layer formula, in hooks written here: the same CE and FVUs."""
    import torch.nn.functional as F

    from nanosae import DataConfig
    from nanosae.data import iter_documents, token_batches

    data = DataConfig(specs=[str(word_corpus)], context_size=16, split="eval")
    tcs = random_transcoders(tiny_model, cross_layer=True, skip=True)
    batch = next(token_batches(iter_documents(data), tiny_model.tokenizer, 16, 8))
    r = C.replacement_scores(tiny_model, tcs, data, tokens=int(batch.valid.sum()), batch_size=8)
    keep = batch.valid[:, :-1] & batch.valid[:, 1:]
    lat, seen = {}, {}

    def read(L):
        def fn(x):
            seen[L], lat[L] = x, tcs[L].encode(x)

        return fn

    hooks = {}
    for L in range(tiny_model.n_layers):
        hooks[C.mlp_hooks(L)[0]] = read(L)
        hooks[C.mlp_hooks(L)[1]] = lambda y, L=L: cross_layer_output(tcs, L, lat, seen[L])
    with torch.no_grad(), tiny_model.hooks(hooks):
        logits = tiny_model.forward(batch.tokens)
    replaced = F.cross_entropy(logits[:, :-1][keep], batch.tokens[:, 1:][keep])
    assert r["ce_loss_replaced"] == pytest.approx(float(replaced), rel=1e-5)
    # FVU of each layer's output on the clean model's activations, the earlier layers' latents included
    names = [h for L in range(tiny_model.n_layers) for h in C.mlp_hooks(L)]
    _, cache = tiny_model.run_with_cache(batch.tokens, names)
    with torch.no_grad():
        clean_lat = {L: tcs[L].encode(cache[C.mlp_hooks(L)[0]][batch.valid]) for L in range(tiny_model.n_layers)}
    for L in range(tiny_model.n_layers):
        x, y = (cache[h][batch.valid] for h in C.mlp_hooks(L))
        with torch.no_grad():
            err = (cross_layer_output(tcs, L, clean_lat, x) - y).pow(2).sum()
        assert r["fvu_by_layer"][str(L)] == pytest.approx(float(err / (y - y.mean(0)).pow(2).sum()), rel=1e-4)


def test_feature_edits_add_the_decoder_direction_at_that_place_only(tiny_model):
    tcs = random_transcoders(tiny_model)
    ids = torch.tensor([TOKENS])
    clean = C.clean_pass(tiny_model, tcs, ids)
    layer, pos = 1, 3
    latent = int(clean.latents[layer][pos].argmax())
    old = float(clean.latents[layer][pos, latent])
    _, before = tiny_model.run_with_cache(ids, [C.mlp_hooks(layer)[1]])
    with C.feature_edits(tiny_model, tcs, ids, [((layer, latent, pos), "=", old + 5.0)]) as was:
        _, after = tiny_model.run_with_cache(ids, [C.mlp_hooks(layer)[1]])
    assert was == {(layer, latent, pos): pytest.approx(old)}
    delta = after[C.mlp_hooks(layer)[1]][0] - before[C.mlp_hooks(layer)[1]][0]
    assert torch.allclose(delta[pos], 5.0 * tcs[layer].W_dec[latent].detach(), atol=1e-5)
    assert delta[torch.arange(len(TOKENS)) != pos].abs().max() == 0
    same = C.intervene(tiny_model, tcs, TOKENS, [((layer, latent, pos), "*", 1.0)], max_new_tokens=4)
    assert same["original"] == same["edited"]
    moved = C.intervene(tiny_model, tcs, TOKENS, [((layer, latent, pos), "=", old + 50.0)], max_new_tokens=4)
    assert moved["original"]["top"] != moved["edited"]["top"]
    with pytest.raises(Exception, match="LAYER_LATENT_POS"):
        C.parse_node_edit("12-3")
    assert C.parse_node_edit("12_345_5=0") == ((12, 345, 5), "=", 0.0)
    assert C.parse_node_edit("3_7_2*-1.5") == ((3, 7, 2), "*", -1.5)


def test_cross_layer_feature_edits_move_every_mlp_the_feature_writes_to(tiny_model):
    tcs = random_transcoders(tiny_model, cross_layer=True)
    ids = torch.tensor([TOKENS])
    clean = C.clean_pass(tiny_model, tcs, ids)
    pos = 3
    latent = int(clean.latents[0][pos].argmax())

    # the later MLPs' outputs would move anyway (the residual changes): read the change at each MLP as its
    # output minus what the unedited MLP computes from its (changed) input, i.e. what the edit added there
    def added(edits):
        got = {}
        hooks = {}
        for L in range(tiny_model.n_layers):
            read, write = C.mlp_hooks(L)
            mlp = tiny_model.module.model.layers[L].mlp
            hooks[read] = lambda x, L=L: got.__setitem__(("in", L), x)
            hooks[write] = lambda y, L=L, mlp=mlp: got.__setitem__(  # the MLP by hand: its own hook would recurse
                L,
                y
                - mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(got[("in", L)])) * mlp.up_proj(got[("in", L)])),
            )
        with C.feature_edits(tiny_model, tcs, ids, edits), tiny_model.hooks(hooks):
            tiny_model.forward(ids)
        return got

    moved = added([((0, latent, pos), "*", 3.0)])
    old = float(clean.latents[0][pos, latent])
    for L in range(tiny_model.n_layers):
        expected = (
            2.0 * old * (tcs[0].W_dec[latent] if L == 0 else tcs.later[0][latent, L - 1]) / tcs[L].output_factor()
        )
        assert torch.allclose(moved[L][0, pos], expected.detach(), atol=1e-4)
        assert moved[L][0, torch.arange(len(TOKENS)) != pos].abs().max() < 1e-5


def test_attribution_refuses_a_model_it_cannot_freeze_in_one_line():
    """Freezing needs Hugging Face's attention interface or nanosae's own nanochat module."""
    from types import SimpleNamespace

    from nanosae.errors import ConfigError

    with pytest.raises(ConfigError, match="attribution needs a Hugging Face model or a nanochat checkpoint"):
        with C.frozen(SimpleNamespace(module=torch.nn.Linear(2, 2))):
            pass


def test_the_graph_file_shows_exactly_the_kept_nodes_and_bos_errors_have_no_edges(tiny_model):
    """Viewers (Neuronpedia's, circuit-tracer's) show a node when its `influence` <= the node threshold: that must
    be every feature and error node pruning kept; and BOS error nodes, constants of the frozen model, have no
    edges (transcoders never train on BOS)."""
    graph = C.attribute(tiny_model, random_transcoders(tiny_model), TOKENS)
    for L in graph.layers:
        assert not graph.adjacency[:, graph.error_index(L, 0)].any()
    assert graph.adjacency[:, [graph.error_index(L, 2) for L in graph.layers]].abs().sum() > 0
    influence = C.node_influence(graph.adjacency, C.logit_weights(graph))[: graph.token_index(0)]
    for share in (0.5, 0.8):
        data = C.to_neuronpedia(graph, node_share=share, edge_share=1.0)
        inner = [
            n for n in data["nodes"] if n["feature_type"] in ("cross layer transcoder", "mlp reconstruction error")
        ]
        assert inner and all(n["influence"] < share for n in inner)
        keep, _ = C.prune(graph, node_share=share, edge_share=1.0)
        assert len(inner) == int(keep[: graph.token_index(0)].sum())
        # the field is the share carried by more influential nodes, recomputed here by sorting
        shares = influence / influence.sum()
        index = {f"{L}_{i}_{p}": j for j, (L, p, i) in enumerate(graph.features.tolist())}
        index |= {f"{L}_-1_{p}": graph.error_index(L, p) for L in graph.layers for p in range(graph.n_pos)}
        for n in inner:
            i = index[n["node_id"]]
            assert n["influence"] == pytest.approx(float(shares[shares > shares[i]].sum()), abs=1e-5)


def test_chosen_targets_and_logit_differences_are_rows_of_the_default_graph(tiny_model):
    """A chosen target's row is the row the default graph has for that token; a logit difference a − b is row a
    minus row b (each row is its logit minus the mean logit, and the means cancel)."""
    tcs = random_transcoders(tiny_model)
    full = C.attribute(tiny_model, tcs, TOKENS, max_logits=3, logit_probability=0.999)
    a, b = full.logit_tokens[:2]
    one = C.attribute(tiny_model, tcs, TOKENS, targets=[b])
    assert one.logit_tokens == [b] and torch.equal(one.features, full.features)
    n = full.logit_index(0)  # the sources' columns (the graphs differ in their number of logit nodes)
    torch.testing.assert_close(one.adjacency[one.logit_index(0), :n], full.adjacency[full.logit_index(1), :n])
    diff = C.attribute(tiny_model, tcs, TOKENS, targets=[a], contrast=b)
    expected = full.adjacency[full.logit_index(0), :n] - full.adjacency[full.logit_index(1), :n]
    torch.testing.assert_close(diff.adjacency[diff.logit_index(0), :n], expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().max() > 1e-2
    label = next(n for n in C.to_neuronpedia(diff)["nodes"] if n["feature_type"] == "logit")["clerp"]
    assert f'minus "{diff.info["contrast"]}"' in label


def test_a_trace_estimates_its_memory_and_refuses_what_would_not_fit(tiny_model):
    """The frozen pass's memory is per copy of the prompt (three copies hold three times one copy's); the batch
    size the estimate says fits does fit and one more does not; a limit below the estimate refuses the trace
    before the expensive part, naming the batch size that fits; a limit at the estimate runs it."""
    tcs = random_transcoders(tiny_model)
    clean = C.clean_pass(tiny_model, tcs, torch.tensor([TOKENS]))
    feats = [(L, p, i) for L in tcs.layers for p, i in clean.latents[L].nonzero().tolist() if p >= 1]
    features = torch.tensor(feats)
    acts = torch.tensor([float(clean.latents[L][p, i]) for L, p, i in feats])
    weights = {p.untyped_storage().data_ptr() for p in tiny_model.module.parameters()}
    weights |= {p.untyped_storage().data_ptr() for tc in tcs.by_layer.values() for p in tc.parameters()}
    for logits in (False, True):
        one, three = (
            C.pass_bytes(lambda n=n: C.FrozenPass(tiny_model, tcs, clean, features, acts, n, logits), weights)
            for n in (1, 3)
        )
        assert three == pytest.approx(3 * one, rel=0.05)
    seen: list[int] = []
    graph = C.attribute(tiny_model, tcs, TOKENS, batch_size=8, memory_limit=2**50, on_estimate=seen.append)
    estimate = C.estimate_memory(tiny_model, tcs, clean, features, acts, len(graph.logit_tokens), len(feats))
    limit = estimate.total(8, len(feats))
    assert seen == [graph.info["memory_estimate"]] == [limit]  # what attribute estimated, before its work
    fits = estimate.largest_batch(limit, len(feats))
    assert fits >= 8 and estimate.total(fits, len(feats)) <= limit < estimate.total(fits + 1, len(feats))
    with pytest.raises(ConfigError, match=r"needs about .* GiB more memory .* use --batch-size 7") as e:
        C.attribute(tiny_model, tcs, TOKENS, batch_size=64, memory_limit=limit - 1, on_estimate=seen.append)
    assert "\n" not in str(e.value) and len(seen) == 1  # refused before the work: nothing reported as started
    with pytest.raises(ConfigError, match="fewer --max-feature-nodes or a shorter prompt"):
        C.attribute(tiny_model, tcs, TOKENS, memory_limit=1)


def test_interventions_report_the_downstream_features_they_move(tiny_model):
    """The reported downstream changes are what a hand-made edit of the same MLP output does to the later layers'
    latents; nothing at or before the edited layer, or at an earlier position, is reported as moved."""
    tcs = random_transcoders(tiny_model)
    ids = torch.tensor([TOKENS])
    clean = C.clean_pass(tiny_model, tcs, ids)
    layer, pos = 0, 3
    latent = int(clean.latents[layer][pos].argmax())
    result = C.intervene(tiny_model, tcs, TOKENS, [((layer, latent, pos), "=", 40.0)], max_new_tokens=2, top=50)
    assert result["downstream"]
    direction = 40.0 - float(clean.latents[layer][pos, latent])

    def add(y):
        y = y.clone()
        y[:, pos] += direction * tcs[layer].W_dec[latent].detach()
        return y

    with tiny_model.hooks({C.mlp_hooks(layer)[1]: add}):
        by_hand = C.latents_on(tiny_model, tcs, ids)
    moved = [abs(after - before) for _, before, after in result["downstream"]]
    assert moved == sorted(moved, reverse=True)
    for node, before, after in result["downstream"]:
        L, f, p = C.node_key(node)
        assert L > layer and p >= pos  # causal: later layers, this position or later
        assert before == pytest.approx(float(clean.latents[L][p, f]), abs=1e-5)
        assert after == pytest.approx(float(by_hand[L][p, f]), abs=1e-5)


@pytest.mark.parametrize("skip,cross_layer", [(False, False), (True, False), (False, True)])
def test_constrained_everywhere_a_logit_moves_by_the_graphs_direct_edges(tiny_model, skip, cross_layer):
    """With every layer constrained (circuit-tracer's direct effects) the model is the graph's frozen linear model:
    changing features by d·activation moves each target's logit minus the mean logit by d·(the sum of their edges
    into it), while the model run as it is does not."""
    tcs = random_transcoders(tiny_model, skip=skip, cross_layer=cross_layer)
    ids = torch.tensor([TOKENS])
    graph = C.attribute(tiny_model, tcs, TOKENS, batch_size=64)
    target = graph.logit_index(0)
    early = (graph.features[:, 1] < len(TOKENS) - 1).nonzero().squeeze(1)  # paths through attention
    picked = early[graph.adjacency[target, early].abs().topk(3).indices]
    edits = [((int(L), int(f), int(p)), "*", 1.5) for L, p, f in graph.features[picked].tolist()]

    def logit_moves(**how):
        with torch.no_grad():
            before = tiny_model.forward(ids)[0, -1]
            with C.feature_edits(tiny_model, tcs, ids, edits, **how):
                after = tiny_model.forward(ids)[0, -1]
        return (after - after.mean()) - (before - before.mean())

    expected = 0.5 * graph.adjacency[:, picked][graph.logit_index(0) :].sum(1)
    got = logit_moves(freeze_attention=True, constrained=range(tiny_model.n_layers))[graph.logit_tokens]
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)
    assert float(expected.abs().max()) > 1e-2
    live = logit_moves()[graph.logit_tokens]
    assert not torch.allclose(live, expected, atol=1e-2 * float(expected.abs().max()), rtol=1e-2)


def test_frozen_attention_keeps_the_clean_runs_patterns(tiny_model):
    """With --freeze-attention a later layer's attention output is the clean run's pattern (Hugging Face's own
    eager attention, asked for its weights) times the edited run's values; run as it is, it is not."""
    tcs = random_transcoders(tiny_model)
    ids = torch.tensor([TOKENS])
    clean = C.clean_pass(tiny_model, tcs, ids)
    latent = int(clean.latents[0][2].argmax())
    edits = [((0, latent, 2), "=", 30.0)]
    config = tiny_model.module.config
    old, config._attn_implementation = config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            pattern = tiny_model.module(ids, output_attentions=True).attentions[1]  # (1, heads, T, T)
    finally:
        config._attn_implementation = old
    attn = tiny_model.module.model.layers[1].self_attn
    seen = {}
    handle = attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(h=kwargs["hidden_states"], out=out[0]), with_kwargs=True
    )

    def by_hand():
        h = seen["h"]
        v = attn.v_proj(h).view(1, len(TOKENS), -1, attn.head_dim).transpose(1, 2)
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], dim=1)
        return attn.o_proj((pattern @ v).transpose(1, 2).reshape(1, len(TOKENS), -1))

    try:
        with torch.no_grad():
            for freeze in (True, False):
                with C.feature_edits(tiny_model, tcs, ids, edits, freeze_attention=freeze):
                    tiny_model.forward(ids)
                assert torch.allclose(seen["out"], by_hand(), atol=1e-5) == freeze
    finally:
        handle.remove()
    assert InterveneConfig(transcoders="x", edits=["0_1_2=3"], constrained_layers="1-2").constrained(4) == [1, 2]
    assert InterveneConfig(transcoders="x", edits=["0_1_2=3"], constrained_layers="all").constrained(2) == [0, 1]
    with pytest.raises(Exception, match="--constrained-layers '5': expected all, A-B or L,L"):
        InterveneConfig(transcoders="x", edits=["0_1_2=3"], constrained_layers="5").constrained(4)


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen3", "float32"), ("qwen3", "bfloat16")])
def test_the_written_out_backward_equals_autograd_through_the_model(family, dtype, tmp_path):
    """LinearPass's rows (every feature, every logit, a logit difference) are FrozenPass's, whose autograd runs
    through the model's own modules: Qwen3 has query/key norms and heads wider than d_model / n_heads. In
    bfloat16 both round, differently. Gemma-2 (sandwich norms) and a set that leaves an MLP are not written out."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import nanosae
    from tests.conftest import make_hf_tokenizer
    from tests.models.test_families import SHAPE, build

    if family == "qwen3":
        torch.manual_seed(0)
        module = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16)).eval()
    else:
        module = build(family)
    module.save_pretrained(tmp_path)
    make_hf_tokenizer(64).save_pretrained(tmp_path)
    model = nanosae.load_model(str(tmp_path), dtype=getattr(torch, dtype))
    tcs = random_transcoders(model)
    for tc in tcs.by_layer.values():
        tc.to(model.dtype)
    assert C.LinearPass.supports(model, tcs)
    assert not C.LinearPass.supports(model, C.TranscoderSet({0: tcs[0], 2: tcs[2]}))
    clean = C.clean_pass(model, tcs, torch.tensor([TOKENS]))
    feats = [(L, p, i) for L in tcs.layers for p, i in clean.latents[L].nonzero().tolist() if p >= 1]
    features = torch.tensor(feats)
    acts = torch.tensor([float(clean.latents[L][p, i]) for L, p, i in feats])
    T = len(TOKENS)
    targets = [("feature", *f) for f in feats] + [("logit", -1, T - 1, t) for t in (3, 17, 40)]
    contrast = {17: 40}
    linear = C.LinearPass(model, tcs, clean, features, acts).rows(targets, contrast)
    autograd = C.FrozenPass(model, tcs, clean, features, acts, len(targets), logits=True).rows(targets, contrast)
    scale = autograd.abs().max()
    assert scale > 1e-2 and (autograd.abs() > 1e-3 * scale).sum() > 100
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    assert (linear - autograd).abs().max() <= tolerance * scale
    emb, grads = C.LinearPass(model, tcs, clean, features, acts).gradients(targets[:3])
    held = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [emb, *grads.values()] if t is not None
    }
    assert sum(held.values()) <= 3 * C.LinearPass.bytes_held(model, tcs, T)[0]  # what the estimate counts

    gemma = build("gemma2")
    gemma.save_pretrained(tmp_path / "gemma")
    make_hf_tokenizer(64).save_pretrained(tmp_path / "gemma")
    assert not C.LinearPass.supports(nanosae.load_model(str(tmp_path / "gemma")), random_transcoders(model))
