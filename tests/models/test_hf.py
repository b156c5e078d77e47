import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nanosae
from nanosae import HookError
from tests.conftest import assert_replay_matches

TOKENS = torch.tensor([[0, 5, 9, 13, 22, 7, 41, 3], [0, 60, 2, 8, 8, 19, 33, 50]])


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_shapes_and_names(model):
    assert (model.n_layers, model.d_model, model.d_mlp) == (3, 32, 48)
    names = model.hook_names()
    assert "blocks.0.hook_resid_pre" in names and "blocks.2.mlp.hook_post" in names and len(names) == 21


def test_mlp_input_hook_is_the_normed_mid_residual(model):
    """ln2.hook_normalized is what the MLP reads: post_attention_layernorm(resid_mid), and MLP(it) = mlp_out."""
    names = ["blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    _, c = model.run_with_cache(TOKENS, names)
    layer = model.module.model.layers[1]
    with torch.no_grad():
        assert torch.allclose(c[names[1]], layer.post_attention_layernorm(c[names[0]]), atol=1e-6)
        assert torch.allclose(layer.mlp(c[names[1]]), c[names[2]], atol=1e-6)
    # replacing it changes what the MLP computes
    with model.hooks({names[1]: lambda x: torch.zeros_like(x)}):
        _, edited = model.run_with_cache(TOKENS, [names[2]])
    with torch.no_grad():
        assert torch.allclose(edited[names[2]], layer.mlp(torch.zeros_like(c[names[1]])), atol=1e-6)


def test_resid_post_equals_hidden_states(model):
    names = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    logits, cache = model.run_with_cache(TOKENS, names)
    out = model.module(input_ids=TOKENS, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then each layer (the last one after the final norm)
    for i in range(2):
        assert torch.allclose(cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1], atol=1e-6)
    final_norm = model.module.model.norm
    assert torch.allclose(final_norm(cache["blocks.2.hook_resid_post"]), hidden[3], atol=1e-6)
    assert torch.allclose(logits, out.logits, atol=1e-6)
    assert cache["blocks.0.hook_resid_post"].shape == (2, 8, 32)


def test_stop_at_layer_matches_full_pass(model):
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    _, full = model.run_with_cache(TOKENS, names)
    logits, early = model.run_with_cache(TOKENS, names, return_logits=False)
    assert logits is None
    for name in names:
        assert torch.equal(full[name], early[name])
    with pytest.raises(HookError, match="ends the pass before block 1"):
        model.run_with_cache(TOKENS, names, stop_at_layer=1)


def test_stop_really_skips_later_blocks(model):
    calls = []
    handle = model.layers[2].block.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        model.run_with_cache(TOKENS, ["blocks.1.hook_resid_post"], return_logits=False)
        assert calls == []
        model.run_with_cache(TOKENS, ["blocks.1.hook_resid_post"])
        assert calls == [1]
    finally:
        handle.remove()


def test_block_decomposition_invariants(model):
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    _, c = model.run_with_cache(TOKENS, [f"blocks.1.{k}" for k in kinds])
    get = lambda k: c[f"blocks.1.{k}"]
    layer = model.module.model.layers[1]
    assert torch.allclose(get("hook_resid_mid"), get("hook_resid_pre") + get("hook_attn_out"), atol=1e-6)
    mlp_in = layer.post_attention_layernorm(get("hook_resid_mid"))
    post = F.silu(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
    assert get("mlp.hook_post").shape == (2, 8, 48)
    assert torch.allclose(get("mlp.hook_post"), post, atol=1e-6)
    assert torch.allclose(get("hook_mlp_out"), layer.mlp.down_proj(post), atol=1e-6)
    assert torch.allclose(get("hook_resid_post"), get("hook_resid_mid") + get("hook_mlp_out"), atol=1e-6)


def test_adding_a_vector_changes_logits_as_by_hand(model):
    v = torch.randn(32)
    _, cache = model.run_with_cache(TOKENS, ["blocks.2.hook_resid_post"])
    by_hand = model.module.lm_head(model.module.model.norm(cache["blocks.2.hook_resid_post"] + v))
    with model.hooks({"blocks.2.hook_resid_post": lambda x: x + v}):
        hooked = model.forward(TOKENS)
    assert torch.allclose(hooked, by_hand, atol=1e-5)
    # the same edit at resid_pre of the next block is the same edit
    with model.hooks({"blocks.0.hook_resid_post": lambda x: x + v}):
        a = model.forward(TOKENS)
    with model.hooks({"blocks.1.hook_resid_pre": lambda x: x + v}):
        b = model.forward(TOKENS)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(model.forward(TOKENS), model.module(input_ids=TOKENS).logits)  # hooks gone


def test_resid_mid_edit_reaches_the_residual_stream(model):
    v = torch.randn(32)
    _, clean = model.run_with_cache(TOKENS, ["blocks.1.hook_resid_mid"])
    with model.hooks({"blocks.1.hook_resid_mid": lambda x: x + v}):
        _, c = model.run_with_cache(
            TOKENS, ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
        )
    layer = model.module.model.layers[1]
    new_mid = clean["blocks.1.hook_resid_mid"] + v
    assert torch.allclose(c["blocks.1.hook_resid_mid"], new_mid, atol=1e-6)  # later hooks see the edit
    expected_post = new_mid + layer.mlp(layer.post_attention_layernorm(new_mid))
    assert torch.allclose(c["blocks.1.hook_resid_post"], expected_post, atol=1e-5)


def test_hooks_removed_after_exception(model):
    def boom(x):
        raise RuntimeError("boom")

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.module.modules())

    before = count()
    with pytest.raises(RuntimeError):
        with model.hooks({f"blocks.0.{k}": boom for k in nanosae.models.HOOK_KINDS}, stop_at_layer=2):
            model.forward(TOKENS)
    assert count() == before


def test_hook_name_errors(model):
    with pytest.raises(HookError, match="did you mean blocks.1.hook_resid_post"):
        model.run_with_cache(TOKENS, ["blocks.1.hook_resid_pots"])
    with pytest.raises(HookError, match=r"layer 7 is out of range \(model has layers 0..2\)"):
        model.run_with_cache(TOKENS, ["blocks.7.hook_resid_post"])


def test_kv_cached_greedy_equals_uncached(model):
    prompt = [0, 5, 9, 13]
    gen = model.generate(prompt, max_new_tokens=10, stop_at_eos=False)
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(model.module(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert gen.tokens == ids[len(prompt) :]
    seen = []
    model.generate(prompt, max_new_tokens=3, stop_at_eos=False, callback=lambda step, tok: seen.append((step, tok)))
    assert seen == list(enumerate(ids[len(prompt) : len(prompt) + 3]))


def test_hooks_apply_during_generation(model):
    v = torch.randn(32) * 10
    calls = []

    def steer(x):
        calls.append(x.shape[1])
        return x + v

    with model.hooks({"blocks.1.hook_resid_post": steer}):
        gen = model.generate([0, 5, 9], max_new_tokens=4, stop_at_eos=False)
    assert calls == [3, 1, 1, 1]  # prefill, then one token per step
    ids = [0, 5, 9]
    with model.hooks({"blocks.1.hook_resid_post": lambda x: x + v}):
        for _ in range(4):
            ids.append(int(model.forward(ids)[0, -1].argmax()))
    assert gen.tokens == ids[3:]


def test_sampling_is_seeded(model):
    a = model.generate([0, 5], max_new_tokens=8, temperature=1.0, top_k=10, seed=3, stop_at_eos=False)
    b = model.generate([0, 5], max_new_tokens=8, temperature=1.0, top_k=10, seed=3, stop_at_eos=False)
    assert a.tokens == b.tokens


def test_replaying_the_clean_prefix_equals_recomputing(model):
    assert_replay_matches(model, TOKENS, layer=1)


FAULTS_CHILD = r"""
import resource, torch
from nanosae.models import keep_freed_memory
print(keep_freed_memory())
def layer():  # six 16 MB activations alive at once, then all freed: a forward pass's pattern
    xs = [torch.ones(4 << 20)]
    for _ in range(5):
        xs.append(xs[-1] + 1)
    return float(xs[-1][0])
layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_freed_activations_instead_of_faulting_fresh_pages():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    runs = {}
    for setting in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_CHILD],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"NANOSAE_MALLOC_TUNING": setting},
        ).stdout.split()
        runs[setting] = (out[0], int(out[1]))
    assert runs["0"][0] == "False" and runs["1"][0] == "True"
    fresh = 10 * 6 * (16 << 20) // 4096  # page faults if every tensor got fresh pages (glibc's defaults mostly do)
    assert runs["1"][1] < fresh / 10, runs


def test_generation_raises_no_deprecation_warnings(model):
    """Cached generation uses the current transformers API (no past_key_values warning in track/steer/viewer)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate([0, 5, 9], max_new_tokens=4, stop_at_eos=False, feed_last=True)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], [
        str(w.message) for w in caught
    ]


def test_logits_at_equals_the_full_forward(model):
    tokens = torch.tensor([[0, 5, 9, 13, 20], [0, 7, 7, 2, 2]])
    full = model.forward(tokens)
    got = model.logits_at(tokens, [4, 2], [3, 11, 40])
    assert torch.allclose(got, full[[0, 1], [4, 2]][:, [3, 11, 40]], atol=1e-5)
