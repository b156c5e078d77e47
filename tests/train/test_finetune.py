"""The end-to-end fine-tune (kl_finetune): its KL against a plain forward pass computed here, that it lowers the
KL of the spliced model, exact resume inside the phase, and its refusals."""

import pytest
import torch

import nanosae
from nanosae import SAE, CollectConfig, ConfigError, DataConfig, SAEConfig, TrainConfig
from nanosae.data import collect
from nanosae.data.corpus import iter_documents
from nanosae.data.tokens import token_batches
from nanosae.train.finetune import clean_pass, spliced_kl

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def word_stores(tiny_model, tiny_llama_dir, word_corpus, tmp_path_factory):
    data = DataConfig(specs=[str(word_corpus)], context_size=32)
    cfg = CollectConfig(
        model=str(tiny_llama_dir),
        hooks=[HOOK, "blocks.1.hook_mlp_out"],
        data=data,
        tokens=4000,
        out=str(tmp_path_factory.mktemp("ft") / "acts"),
    )
    return collect(cfg, model=tiny_model)


def reference_kl(sae: SAE, model, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ spliced) by hand: two whole forward passes (no replayed blocks), float64 softmax."""
    clean_logits = model._logits(tokens).detach()
    _, cache = model.run_with_cache(tokens, [HOOK])
    acts = cache[HOOK]
    x_hat = sae(acts[valid])[0]
    full = torch.zeros_like(acts).index_put((valid,), x_hat) + torch.where(valid[..., None], 0.0, acts)
    with model.hooks({HOOK: lambda _: full}):
        logits = model._logits(tokens)
    keep = valid[:, :-1] & valid[:, 1:]
    p = clean_logits[:, :-1][keep].double().softmax(-1)
    logq = logits[:, :-1][keep].double().log_softmax(-1)
    return (p * (p.log() - logq)).sum(-1).mean()


def test_spliced_kl_and_its_gradient_equal_a_plain_forward_pass(tiny_model, word_corpus):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=16, architecture="topk", k=2, hook_name=HOOK))
    data = DataConfig(specs=[str(word_corpus)], context_size=16)
    batch = next(token_batches(iter_documents(data), tiny_model.tokenizer, 16, 3))
    assert not batch.valid.all()  # BOS positions are left as the model computes them
    for p in tiny_model.module.parameters():
        p.requires_grad_(False)
    ours = spliced_kl(sae, tiny_model, HOOK, batch.tokens, batch.valid, clean_pass(tiny_model, HOOK, batch.tokens))
    ours.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    expected = reference_kl(sae, tiny_model, batch.tokens, batch.valid)
    expected.backward()
    assert float(expected.detach()) > 1e-4  # a k=2 random SAE changes the predictions
    assert abs(float(ours) - float(expected)) <= 1e-5 * float(expected) + 1e-7
    assert set(got) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, grad in got.items():
        assert torch.allclose(grad, dict(sae.named_parameters())[name].grad, rtol=1e-3, atol=1e-6), name


def test_the_fine_tune_trades_reconstruction_for_the_spliced_models_kl(word_stores, tiny_model, word_corpus, tmp_path):
    # A random tiny model barely reads its residual stream (KL ~0.005 nats), so the KL term is weighted to
    # dominate; the same steps and learning rate with and without it (and no decoder refit, which the
    # fine-tune turns off: the comparison is of the fine-tune alone).
    common = dict(
        acts=str(word_stores[HOOK].path),
        d_sae=16,
        k=2,
        batch_size=256,
        tokens=256 * 40,
        checkpoint_every=0,
        lr=1e-2,
        lr_schedule="constant",
        log_every=1,
        refit_decoder=False,
    )
    plain = nanosae.train(TrainConfig.build(out=str(tmp_path / "plain"), **common))
    tuned = nanosae.train(TrainConfig.build(out=str(tmp_path / "tuned"), kl_finetune=0.5, kl_coefficient=1e5, **common))
    assert "kl" not in plain.metrics and tuned.metrics["kl"] > 0  # the last 20 steps trained on KL too
    held_out = DataConfig(specs=[str(word_corpus)], context_size=32, split="eval")
    m_plain, m_tuned = nanosae.evaluate([plain.sae, tuned.sae], tiny_model, held_out, tokens=1500)
    assert m_tuned["kl_div"] < 0.92 * m_plain["kl_div"], (m_plain["kl_div"], m_tuned["kl_div"])
    assert m_tuned["fvu"] > m_plain["fvu"]  # what it gave for it


class Stop(Exception):
    pass


def test_resume_inside_the_fine_tune_is_bit_identical(word_stores, tmp_path):
    common = dict(
        acts=str(word_stores[HOOK].path),
        d_sae=16,
        k=2,
        batch_size=256,
        tokens=256 * 12,
        checkpoint_every=2,
        lr=3e-3,
        log_every=1,
        kl_finetune=0.5,
    )

    def stop_at_9(p):
        if p.step == 9:
            raise Stop

    with pytest.raises(Stop):  # steps 7..12 are the fine-tune; the newest checkpoint is step 8
        nanosae.train(TrainConfig.build(out=str(tmp_path / "cut"), **common), progress=stop_at_9)
    resumed = nanosae.train(TrainConfig.build(out=str(tmp_path / "cut"), resume=True, **common))
    whole = nanosae.train(TrainConfig.build(out=str(tmp_path / "whole"), **common))
    assert resumed.steps == whole.steps == 12
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name


def test_the_fine_tune_refuses_what_it_cannot_do(word_stores, tmp_path):
    common = dict(
        acts=str(word_stores[HOOK].path),
        d_sae=16,
        k=2,
        batch_size=256,
        tokens=256 * 4,
        checkpoint_every=0,
        kl_finetune=0.5,
    )
    with pytest.raises(ConfigError, match="one SAE at a time"):
        nanosae.train(
            [TrainConfig.build(out=str(tmp_path / "a"), **common), TrainConfig.build(out=str(tmp_path / "b"), **common)]
        )
    with pytest.raises(ConfigError, match="a transcoder"):
        nanosae.train(
            TrainConfig.build(
                out=str(tmp_path / "t"), acts_out=str(word_stores["blocks.1.hook_mlp_out"].path), **common
            )
        )
    with pytest.raises(ConfigError, match="kl_finetune must be"):
        TrainConfig.build(kl_finetune=1.5)
