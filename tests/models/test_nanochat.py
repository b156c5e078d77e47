"""nanochat checkpoints of both generations, written by the test in nanochat's own layout, checked
against a straightforward re-statement of the equations (loops over heads, explicit softmax)."""

import json
import math
import os
import pickle

import pytest
import torch

import nanosae
from nanosae import FormatError
from tests.conftest import assert_replay_matches

SPECIAL = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
VOCAB = 256 + len(SPECIAL)  # byte-level ranks + specials = 265
CFG = dict(vocab_size=VOCAB, n_layer=4, n_head=4, n_kv_head=2, n_embd=32)


def write_tokenizer(base):
    import tiktoken

    enc = tiktoken.Encoding(
        name="test",
        pat_str=r"""\s+|\w+|[^\w\s]+""",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={name: 256 + i for i, name in enumerate(SPECIAL)},
    )
    (base / "tokenizer").mkdir(parents=True, exist_ok=True)
    with open(base / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)


def random_state(current: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    n, d, hd, kv = CFG["n_layer"], CFG["n_embd"], CFG["n_embd"] // CFG["n_head"], CFG["n_kv_head"]
    vocab = 320 if current else VOCAB  # current master pads the vocabulary to a multiple of 64
    sd = {"transformer.wte.weight": r(vocab, d, s=1.0), "lm_head.weight": r(vocab, d)}
    for i in range(n):
        p = f"transformer.h.{i}."
        sd |= {
            p + "attn.c_q.weight": r(d, d),
            p + "attn.c_k.weight": r(kv * hd, d),
            p + "attn.c_v.weight": r(kv * hd, d),
            p + "attn.c_proj.weight": r(d, d),
            p + "mlp.c_fc.weight": r(4 * d, d),
            p + "mlp.c_proj.weight": r(d, 4 * d, s=0.1),
        }
        if current and i % 2 == (n - 1) % 2:
            sd[p + "attn.ve_gate.weight"] = r(kv, 12)
    if current:
        sd |= {
            "resid_lambdas": 1 + r(n, s=0.1),
            "x0_lambdas": r(n, s=0.1),
            "smear_gate.weight": r(1, 24),
            "smear_lambda": torch.tensor([0.5]),
            "backout_lambda": torch.tensor([0.2]),
        }
        for i in range(n):
            if i % 2 == (n - 1) % 2:
                sd[f"value_embeds.{i}.weight"] = r(vocab, kv * hd, s=1.0)
    return sd


def write_checkpoint(directory, sd, model_config, step, prefix=""):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v for k, v in sd.items()}, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "model_config": model_config}))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_released")
    write_tokenizer(base)
    sd = random_state(current=False)
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"].bfloat16()  # stored in bf16: upcast on load
    write_checkpoint(base / "base_checkpoints" / "d4", sd, CFG | {"sequence_len": 64}, 1000, prefix="_orig_mod.")
    write_checkpoint(base / "base_checkpoints" / "d4", random_state(False, seed=1), CFG | {"sequence_len": 64}, 500)
    return base / "base_checkpoints" / "d4", {k: v.float() for k, v in sd.items()}


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_current")
    write_tokenizer(base)
    sd = random_state(current=True)
    write_checkpoint(base / "chatsft_checkpoints" / "d4", sd, CFG | {"sequence_len": 512, "window_pattern": "SSSL"}, 42)
    return base / "chatsft_checkpoints" / "d4", sd


# ---- the reference: nanochat's equations, restated plainly --------------------------------------
def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def ref_forward(sd, idx, current, seq_len, windows=True):
    return ref_pass(sd, idx, current, seq_len, windows)[0]


def ref_pass(sd, idx, current, seq_len, windows=True, frozen=None, x0=None, mlp=None):
    """(softcapped logits, logits before the softcap, every MLP's input, x0). frozen: a dict filled with the
    norm scales, attention patterns and gates when empty and read as constants when not (the frozen model);
    x0: replaces the embedding that every block reads; mlp(i, input): replaces MLP i's output."""
    n, d, H, KV = CFG["n_layer"], CFG["n_embd"], CFG["n_head"], CFG["n_kv_head"]
    hd, T = d // H, len(idx)
    base = 100000 if current else 10000
    ang = torch.tensor([[t * base ** (-(2 * j) / hd) for j in range(hd // 2)] for t in range(T)], dtype=torch.float32)
    cos, sin = ang.cos(), ang.sin()
    if not current:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    record = frozen is not None and not frozen
    const = lambda key, value: frozen.setdefault(key, value.detach()) if frozen is not None else value

    def rot(v):  # v (T, hd): halves rotated by -theta
        a, b = v[:, : hd // 2], v[:, hd // 2 :]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], dim=1)

    def scaled(key, x):  # rms(x), its scale a constant when frozen
        return x * const(key, 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps))

    short = math.ceil(seq_len / 4 / 128) * 128
    window = [short, short, short, seq_len] if (current and windows) else [10**9] * n
    if x0 is None:
        x = rms(sd["transformer.wte.weight"][idx])
        if current:
            e = x.clone()
            for t in range(1, T):
                x[t] = e[t] + sd["smear_lambda"] * torch.sigmoid(e[t, :24] @ sd["smear_gate.weight"][0]) * e[t - 1]
        x0 = x
    x, backout, inputs = x0, None, []
    for i in range(n):
        W = lambda name: sd[f"transformer.h.{i}.{name}.weight"]
        if current:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = scaled(("attn", i), x)
        q, k, v = h @ W("attn.c_q").T, h @ W("attn.c_k").T, h @ W("attn.c_v").T
        if current and f"value_embeds.{i}.weight" in sd:
            gate = const(("gate", i), 3 * torch.sigmoid(h[:, :12] @ W("attn.ve_gate").T))  # (T, KV)
            ve = sd[f"value_embeds.{i}.weight"][idx]
            v = v + (gate[:, :, None] * ve.view(T, KV, hd)).reshape(T, KV * hd)
        heads = []
        for hh in range(H):
            g = hh // (H // KV)
            vh = v[:, g * hd : (g + 1) * hd]
            if frozen and not record:
                heads.append(frozen[("pattern", i, hh)] @ vh)
                continue
            qh = rms(rot(q[:, hh * hd : (hh + 1) * hd]))
            kh = rms(rot(k[:, g * hd : (g + 1) * hd]))
            if current:
                qh, kh = qh * 1.2, kh * 1.2
            scores = qh @ kh.T / math.sqrt(hd)
            for t in range(T):
                for s in range(T):
                    if s > t or t - s > window[i]:
                        scores[t, s] = float("-inf")
            heads.append(const(("pattern", i, hh), torch.softmax(scores, dim=-1)) @ vh)
        x = x + torch.cat(heads, dim=1) @ W("attn.c_proj").T
        m = scaled(("mlp", i), x)
        inputs.append(m)
        x = x + (torch.relu(m @ W("mlp.c_fc").T).pow(2) @ W("mlp.c_proj").T if mlp is None else mlp(i, m))
        if current and i == n // 2:
            backout = x
    if current:
        x = x - sd["backout_lambda"] * backout
    logits = (scaled("final", x) @ sd["lm_head.weight"].T)[:, :VOCAB]
    return 15 * torch.tanh(logits / 15), logits, inputs, x0


def test_released_generation_matches_reference(released):
    directory, sd = released
    model = nanosae.load_model(f"nanochat:{directory}")
    assert model.name.endswith("@1000")  # latest step by default
    assert not model.module.config.current
    idx = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    got = model.forward(idx)[0]
    assert got.shape == (20, VOCAB)
    assert torch.allclose(got, ref_forward(sd, idx, current=False, seq_len=64), atol=1e-4)


def test_current_generation_matches_reference_with_windows(current):
    directory, sd = current
    model = nanosae.load_model(str(directory))  # a plain directory with model_*.pt works too
    cfg = model.module.config
    assert cfg.current and cfg.value_embed_layers == (1, 3) and cfg.padded_vocab_size == 320
    idx = torch.randint(0, VOCAB, (140,), generator=torch.Generator().manual_seed(2))  # > the 128-token short window
    got = model.forward(idx)[0]
    assert got.shape == (140, VOCAB)
    ref = ref_forward(sd, idx, current=True, seq_len=512)
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(ref, ref_forward(sd, idx, current=True, seq_len=512, windows=False), atol=1e-3)


def test_resid_pre_is_block_input_after_lambdas(current):
    directory, sd = current
    model = nanosae.load_model(f"nanochat:{directory}")
    idx = torch.randint(0, VOCAB, (1, 12))
    _, c = model.run_with_cache(idx, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"])
    lam, x0lam = sd["resid_lambdas"], sd["x0_lambdas"]
    # block 0's input is lam0*x0 + x0lam0*x0, which gives back x0 (the smeared, normed embedding)
    x0 = c["blocks.0.hook_resid_pre"] / (lam[0] + x0lam[0])
    expected = lam[1] * c["blocks.0.hook_resid_post"] + x0lam[1] * x0
    assert torch.allclose(c["blocks.1.hook_resid_pre"], expected, atol=1e-5)


@pytest.mark.parametrize("which", ["released", "current"])
def test_kv_cached_greedy_equals_uncached(which, request):
    directory, _ = request.getfixturevalue(which)
    model = nanosae.load_model(f"nanochat:{directory}")
    prompt = torch.randint(
        0, 256, (135 if which == "current" else 10,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    gen = model.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model.forward(ids)[0, -1].argmax()))
    assert gen.tokens == ids[len(prompt) :]


def test_step_selection_and_errors(released, tmp_path):
    directory, _ = released
    early = nanosae.load_model(f"nanochat:{directory}@500")
    late = nanosae.load_model(f"nanochat:{directory}")
    assert early.name.endswith("@500") and not torch.equal(early.module.lm_head.weight, late.module.lm_head.weight)
    with pytest.raises(FormatError, match="no checkpoint for step 7 \\(have 500, 1000\\)"):
        nanosae.load_model(f"nanochat:{directory}@7")
    bad = tmp_path / "ckpt"
    write_tokenizer(tmp_path)
    sd = random_state(False)
    write_checkpoint(bad, sd, CFG | {"sequence_len": 64}, 1)
    (bad / "meta_000001.json").unlink()
    with pytest.raises(FormatError, match="meta_000001.json is missing"):
        nanosae.load_model(f"nanochat:{bad}")
    write_checkpoint(bad, sd | {"mystery.weight": torch.zeros(2)}, CFG | {"sequence_len": 64}, 1)
    with pytest.raises(FormatError, match="unknown keys mystery.weight"):
        nanosae.load_model(f"nanochat:{bad}")
    write_checkpoint(bad, sd, CFG | {"sequence_len": 64, "n_embd": 64}, 1)
    with pytest.raises(FormatError, match="checkpoint/config mismatch"):
        nanosae.load_model(f"nanochat:{bad}")


def test_tokenizer(released):
    directory, _ = released
    tok = nanosae.load_model(f"nanochat:{directory}").tokenizer
    ids = tok.encode("hello, world")
    assert tok.decode(ids) == "hello, world" and 256 not in ids
    assert tok.bos_id == 256
    chat = tok.encode_chat("hi")
    assert chat[:2] == [256, 257] and chat[-2:] == [258, 259]


def test_malicious_tokenizer_is_refused(released, tmp_path):
    directory, _ = released
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(FormatError, match="refusing to load"):
        nanosae.load_model(f"nanochat:{directory}", tokenizer=tmp_path / "tok")
    assert not marker.exists()


def test_wrap_live_module(current):
    directory, sd = current
    loaded = nanosae.load_model(f"nanochat:{directory}")
    module = loaded.module
    wrapped = nanosae.wrap(module, loaded.tokenizer)
    idx = torch.randint(0, VOCAB, (2, 9))
    _, a = loaded.run_with_cache(idx, ["blocks.2.hook_resid_post"])
    _, b = wrapped.run_with_cache(idx, ["blocks.2.hook_resid_post"])
    assert torch.equal(a["blocks.2.hook_resid_post"], b["blocks.2.hook_resid_post"])
    assert (
        wrapped.generate([256, 5, 6], max_new_tokens=4, stop_at_eos=False).tokens
        == loaded.generate([256, 5, 6], max_new_tokens=4, stop_at_eos=False).tokens
    )


@pytest.mark.parametrize("which", ["released", "current"])
def test_replaying_the_clean_prefix_equals_recomputing(which, request):
    """Also with the current model's x0 lambdas, value embeddings and backout (taken after block 2 of 4)."""
    directory, _ = request.getfixturevalue(which)
    model = nanosae.load_model(f"nanochat:{directory}")
    assert_replay_matches(model, torch.randint(0, VOCAB, (2, 12)), layer=2)


@pytest.mark.parametrize("which", ["released", "current"])
def test_replacement_model_with_error_nodes_equals_the_model(which, request):
    """Every MLP replaced by a transcoder plus its error node: the logits are the model's (circuits)."""
    from nanosae.interp import circuits as C
    from tests.interp.test_circuits import random_transcoders

    directory, _ = request.getfixturevalue(which)
    model = nanosae.load_model(f"nanochat:{directory}")
    tcs = random_transcoders(model)
    tokens = torch.randint(0, VOCAB, (1, 10))
    clean = C.clean_pass(model, tcs, tokens)
    with torch.no_grad():
        logits = C.replacement_forward(
            model,
            tcs,
            clean.tokens,
            clean.embeddings[None],
            {L: z[None] for L, z in clean.latents.items()},
            {L: e[None] for L, e in clean.errors.items()},
        )
        plain = model.forward(tokens)
    assert torch.allclose(logits, plain, atol=1e-4)
    assert any(e.abs().max() > 0.01 for e in clean.errors.values())


@pytest.mark.parametrize("which,cross_layer", [("released", False), ("current", True)])
def test_every_edge_is_the_jacobian_of_a_hand_written_frozen_nanochat(which, cross_layer, request):
    """Attribution through nanochat (both generations; the current one with x0 lambdas, value embeddings, smear,
    backout, windows and the softcap): every edge equals the Jacobian of the frozen replacement model written
    out above from the checkpoint's tensors, with norm scales, patterns and gates held at their clean values
    and logits taken before the softcap."""
    from nanosae.interp import circuits as C
    from tests.interp.test_circuits import assert_edges_are_the_jacobian, cross_layer_output, random_transcoders

    directory, sd = request.getfixturevalue(which)
    model = nanosae.load_model(f"nanochat:{directory}")
    tcs = random_transcoders(model, skip=cross_layer, cross_layer=cross_layer)
    idx = [256, 40, 7, 99, 13, 200, 5, 61]
    graph = C.attribute(model, tcs, idx, batch_size=16)
    clean = C.clean_pass(model, tcs, torch.tensor([idx]))
    seq_len = 512 if which == "current" else 64
    frozen = {}
    with torch.no_grad():
        plain, _, _, x0 = ref_pass(sd, torch.tensor(idx), which == "current", seq_len, frozen=frozen)
    assert torch.allclose(plain, clean.logits, atol=1e-4)  # the reference is the model
    assert torch.allclose(x0, clean.embeddings, atol=1e-5)  # the token nodes are x0, what every block reads
    n = CFG["n_layer"]

    def f(emb, *lat_err):
        lat, err = lat_err[:n], lat_err[n:]
        mlp = lambda i, m: cross_layer_output(tcs, i, lat, m) + err[i]
        _, logits, inputs, _ = ref_pass(
            sd, torch.tensor(idx), which == "current", seq_len, frozen=frozen, x0=emb, mlp=mlp
        )
        return inputs, logits

    assert_edges_are_the_jacobian(graph, clean, f, tcs)


def test_interventions_on_nanochat_run_live_and_refuse_circuit_tracers_modes_in_one_line(released):
    """nanochat's attention has no pinned form: --freeze-attention / --constrained-layers say so; plain edits run."""
    from nanosae.errors import ConfigError
    from nanosae.interp import circuits as C
    from tests.interp.test_circuits import random_transcoders

    directory, _ = released
    model = nanosae.load_model(f"nanochat:{directory}")
    tcs = random_transcoders(model)
    tokens = torch.randint(0, VOCAB, (1, 6))
    for how in ({"freeze_attention": True}, {"constrained": [0]}):
        with pytest.raises(ConfigError, match="need a Hugging Face model: nanochat's attention has no pinned form"):
            with C.feature_edits(model, tcs, tokens, [((0, 1, 2), "=", 3.0)], **how):
                pass
    with C.feature_edits(model, tcs, tokens, [((0, 1, 2), "=", 3.0)]) as before:
        assert list(before) == [(0, 1, 2)]


def test_two_checkpoints_of_one_run_collect_as_a_pair_and_diff(released, tmp_path):
    """nanochat:DIR@500 against nanochat:DIR@1000: one tokenizer, the same windows, a diffing crosscoder."""
    from nanosae.config import CollectConfig, DataConfig, TrainConfig
    from nanosae.data.collect import collect_pair
    from tests.conftest import write_corpus

    directory, _ = released
    corpus = write_corpus(tmp_path / "docs.jsonl", ["hello world " * 40] * 30)
    hook = "blocks.1.hook_resid_post"
    cfg = CollectConfig(
        model=f"nanochat:{directory}@500",
        hooks=[hook],
        data=DataConfig(specs=[str(corpus)], context_size=32),
        tokens=2000,
        out=str(tmp_path / "pair"),
    )
    pair = collect_pair(cfg, f"nanochat:{directory}@1000")
    a, b = pair["A"][hook], pair["B"][hook]
    assert torch.equal(a.token_ids(0, len(a)), b.token_ids(0, len(b)))
    assert not torch.allclose(a.tokens(0, 100), b.tokens(0, 100))  # two checkpoints, two sets of weights
    run = nanosae.train(
        TrainConfig.build(
            out=str(tmp_path / "diff"),
            architecture="batchtopk",
            d_sae=32,
            k=4,
            tokens=4000,
            crosscoder_acts=[str(a.path), str(b.path)],
        )
    )
    assert run.sae.cfg.crosscoder_models == [a.manifest["model"], b.manifest["model"]]
    assert a.manifest["model"] != b.manifest["model"]
