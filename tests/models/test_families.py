"""The model families researchers train SAEs on (Llama-3.2, Qwen3, Gemma-2), as small random instances built from
their configs and run in bfloat16: hooks against the model's own output_hidden_states, the block decomposition
(Gemma-2's sandwich norms included), truncated passes, and collection."""

import pytest
import torch

import nanosae
from nanosae import ActivationStore, CollectConfig, DataConfig
from nanosae.data import collect, iter_documents, token_batches
from tests.conftest import make_hf_tokenizer

TOKENS = torch.tensor([[0, 5, 9, 13, 22, 7, 41, 3], [0, 60, 2, 8, 8, 19, 33, 50]])
SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def build(family: str):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cfg_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=8)),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=8, sliding_window=4)),
    }[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SHAPE, **extra)).eval()
    with torch.no_grad():  # random norms (their default is exactly 1 or 0), so a norm that is skipped shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma2"])
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build(request.param).save_pretrained(path)
    make_hf_tokenizer(64).save_pretrained(path)
    return request.param, path, nanosae.load_model(str(path), dtype=torch.bfloat16)


def test_resid_post_equals_the_models_own_hidden_states(family):
    _, _, model = family
    assert model.dtype == torch.bfloat16
    names = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    logits, cache = model.run_with_cache(TOKENS, names)
    out = model.module(input_ids=TOKENS, output_hidden_states=True)
    for i in range(2):  # the last hidden state is after the final norm
        assert cache[names[i]].dtype == torch.bfloat16
        assert torch.equal(cache[names[i]], out.hidden_states[i + 1]), i
    assert torch.equal(logits, out.logits)


def test_block_decomposition(family):
    """resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out, and mlp_out is what the MLP (and, in
    Gemma-2, its post-norm) makes of ln2.hook_normalized: the values that join the residual stream."""
    name, _, model = family
    kinds = [
        "hook_resid_pre",
        "hook_attn_out",
        "hook_resid_mid",
        "ln2.hook_normalized",
        "mlp.hook_post",
        "hook_mlp_out",
        "hook_resid_post",
    ]
    _, c = model.run_with_cache(TOKENS, [f"blocks.1.{k}" for k in kinds])
    get = lambda k: c[f"blocks.1.{k}"]
    layer = model.module.model.layers[1]
    assert torch.equal(get("hook_resid_mid"), get("hook_resid_pre") + get("hook_attn_out"))
    assert torch.equal(get("hook_resid_post"), get("hook_resid_mid") + get("hook_mlp_out"))
    with torch.no_grad():
        pre_mlp_norm = layer.pre_feedforward_layernorm if name == "gemma2" else layer.post_attention_layernorm
        assert torch.equal(get("ln2.hook_normalized"), pre_mlp_norm(get("hook_resid_mid")))
        mlp_out = layer.mlp(get("ln2.hook_normalized"))
        if name == "gemma2":
            mlp_out = layer.post_feedforward_layernorm(mlp_out)
        assert torch.equal(get("hook_mlp_out"), mlp_out)
        assert torch.equal(layer.mlp.down_proj(get("mlp.hook_post")), layer.mlp(get("ln2.hook_normalized")))


def test_resid_mid_edit_reaches_the_residual(family):
    _, _, model = family
    v = torch.randn(32).bfloat16()
    _, clean = model.run_with_cache(TOKENS, ["blocks.1.hook_resid_mid"])
    with model.hooks({"blocks.1.hook_resid_mid": lambda x: x + v}):
        _, edited = model.run_with_cache(TOKENS, ["blocks.1.hook_resid_mid"])
    assert torch.allclose(
        edited["blocks.1.hook_resid_mid"].float(), (clean["blocks.1.hook_resid_mid"] + v).float(), atol=0.05
    )


def test_truncated_pass_equals_the_full_one(family):
    _, _, model = family
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    _, full = model.run_with_cache(TOKENS, names)
    logits, early = model.run_with_cache(TOKENS, names, return_logits=False)
    assert logits is None
    for n in names:
        assert torch.equal(full[n], early[n])


def test_collection_in_bfloat16(family, word_corpus, tmp_path):
    _, path, model = family
    data = DataConfig(specs=[str(word_corpus)], context_size=16, split="all")
    cfg = CollectConfig(
        model=str(path),
        hooks=["blocks.1.hook_resid_post"],
        data=data,
        tokens=200,
        out=str(tmp_path),
        batch_size=4,
        dtype="float32",
        model_dtype="bfloat16",
    )
    collect(cfg)
    store = ActivationStore(tmp_path / "blocks.1.hook_resid_post")
    assert store.manifest["model_dtype"] == "bfloat16"
    expected = []
    for batch in token_batches(iter_documents(data), model.tokenizer, 16, 4):
        _, cache = model.run_with_cache(batch.tokens, ["blocks.1.hook_resid_post"])
        expected.append(cache["blocks.1.hook_resid_post"][batch.valid])
    assert torch.equal(store.tokens(0, 200), torch.cat(expected)[:200].float())
