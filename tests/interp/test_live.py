import pytest
import torch

from nanosae import SAE, ConfigError, SAEConfig
from nanosae.interp.live import Edit, FeatureTracker, parse_edit, steer, steering

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture()
def sae():
    torch.manual_seed(3)
    s = SAE(SAEConfig(d_in=32, d_sae=48, architecture="topk", k=6, hook_name=HOOK, activation_scale=0.5))
    return s


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tracked_latents_are_each_tokens_own_position_in_one_full_pass(tiny_model, sae, temperature):
    """A prompt plus a 16-token generation, tracked: beside every generated token, the latents of that token's
    own position, equal to the SAEs' latents from one plain forward pass over the same tokens."""
    other = SAE(SAEConfig(d_in=32, d_sae=16, architecture="relu", hook_name="blocks.0.hook_resid_post"))
    tracker = FeatureTracker(tiny_model, {"a": sae, "b": other}, top_k=3, labels={("a", 0): "zero"})
    seen = []
    gen = tracker.generate(
        [0, 5, 9, 13], max_new_tokens=16, stop_at_eos=False, temperature=temperature, callback=seen.append
    )
    assert [t.token for t in seen] == gen.tokens and len(seen) == 16
    plain = tiny_model.generate([0, 5, 9, 13], max_new_tokens=16, stop_at_eos=False, temperature=temperature)
    assert plain.tokens == gen.tokens  # tracking does not change what is generated
    full = torch.tensor([gen.prompt_tokens + gen.tokens])
    _, cache = tiny_model.run_with_cache(full, [HOOK, "blocks.0.hook_resid_post"])
    for t in seen:
        pos = len(gen.prompt_tokens) + t.step  # the token's own position
        for name, s in (("a", sae), ("b", other)):
            z = s.encode(cache[s.cfg.hook_name][0, pos]).detach()
            vals, idx = z.topk(3)
            expected = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
            got = [(f.latent, f.activation) for f in t.features if f.sae == name]
            assert [i for i, _ in got] == [i for i, _ in expected]
            assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)
    summary = tracker.summary(3)
    assert summary and summary[0][1] >= summary[-1][1]


def test_hidden_latents_stay_out_of_the_tracked_top_features(tiny_model, sae):
    """Dense latents (here the three most frequent on this text, declared hidden) are never among a token's top
    features; the rest are the top-k of the encoding with them set to zero."""
    plain = FeatureTracker(tiny_model, {"a": sae}, top_k=3)
    plain.generate([0, 5, 9, 13], max_new_tokens=12, stop_at_eos=False)
    counts: dict[int, int] = {}
    for t in plain.history:
        for f in t.features:
            counts[f.latent] = counts.get(f.latent, 0) + 1
    hidden = set(sorted(counts, key=counts.get, reverse=True)[:3])
    tracker = FeatureTracker(tiny_model, {"a": sae}, top_k=3, hidden={"a": hidden})
    gen = tracker.generate([0, 5, 9, 13], max_new_tokens=12, stop_at_eos=False)
    full = torch.tensor([gen.prompt_tokens + gen.tokens])
    _, cache = tiny_model.run_with_cache(full, [HOOK])
    for t in tracker.history:
        z = sae.encode(cache[HOOK][0, len(gen.prompt_tokens) + t.step]).detach()
        z[sorted(hidden)] = 0
        expected = [int(i) for v, i in zip(*z.topk(3)) if v > 0]
        assert [f.latent for f in t.features] == expected and not {f.latent for f in t.features} & hidden


def test_parse_edit():
    assert parse_edit("123=+8") == Edit(123, 8.0, "add")
    assert parse_edit("5=-2.5") == Edit(5, -2.5, "add")
    assert parse_edit("77=0") == Edit(77, 0.0, "clamp")
    assert parse_edit("7=3") == Edit(7, 3.0, "clamp")
    with pytest.raises(ConfigError, match="cannot read feature edit"):
        parse_edit("x=1")


def test_strength_zero_equals_baseline(tiny_model, sae):
    base, steered = steer(tiny_model, sae, [Edit(3, 0.0, "add")], [0, 5, 9], max_new_tokens=5, stop_at_eos=False)
    assert base.tokens == steered.tokens


def test_add_moves_along_the_decoder_direction(tiny_model_on, sae, device):
    tiny_model, sae = tiny_model_on, sae.to(device)
    toks = torch.tensor([[0, 5, 9, 13]])
    _, clean = tiny_model.run_with_cache(toks, [HOOK])
    with steering(tiny_model, sae, [Edit(4, 2.0, "add")]):
        _, c = tiny_model.run_with_cache(toks, ["blocks.2.hook_resid_pre"])
    # resid_pre of the next block is the edited resid_post
    assert torch.allclose(c["blocks.2.hook_resid_pre"], clean[HOOK] + 2.0 * sae.W_dec[4] / 0.5, atol=1e-5)


def test_clamp_changes_only_that_latent(tiny_model_on, sae, device):
    tiny_model, sae = tiny_model_on, sae.to(device)
    toks = torch.tensor([[0, 5, 9, 13]])
    _, clean = tiny_model.run_with_cache(toks, [HOOK])
    x = clean[HOOK]
    z = sae.encode(x)
    with steering(tiny_model, sae, [Edit(7, 3.0, "clamp")]):
        _, c = tiny_model.run_with_cache(toks, ["blocks.2.hook_resid_pre"])
    expected = x + (3.0 - z[..., 7:8]) * sae.W_dec[7] / 0.5
    assert torch.allclose(c["blocks.2.hook_resid_pre"], expected, atol=1e-5)
    with steering(tiny_model, sae, [Edit(7, 0.0, "clamp")]):  # ablation
        _, c = tiny_model.run_with_cache(toks, ["blocks.2.hook_resid_pre"])
    assert torch.allclose(c["blocks.2.hook_resid_pre"], x - z[..., 7:8] * sae.W_dec[7] / 0.5, atol=1e-5)
    assert not sae.use_error_term  # restored
    with pytest.raises(ConfigError, match="out of range"):
        with steering(tiny_model, sae, [Edit(99, 1.0, "clamp")]):
            pass


def test_fluency_is_the_mean_log_probability_less_a_share_for_repeats(tiny_model):
    """The demo's steering check, by hand: a continuation's mean log-probability under the model, and for
    repeated tokens half of it again times the share of repeats ("self.self.self" does not read)."""
    from nanosae.demo import fluency

    ids = tiny_model.prompt_ids("w5 w6")

    def mean_logprob(tokens):
        logits = tiny_model.forward(torch.tensor([ids + tokens]))[0, len(ids) - 1 : -1].log_softmax(-1)
        return float(logits[torch.arange(len(tokens)), torch.tensor(tokens)].mean())

    distinct, repeated = [7, 9, 11, 13, 15, 17], [7, 7, 7, 7, 9, 9]
    assert fluency(tiny_model, "w5 w6", distinct) == pytest.approx(mean_logprob(distinct))
    m = mean_logprob(repeated)
    assert fluency(tiny_model, "w5 w6", repeated) == pytest.approx(m - 0.5 * abs(m) * (1 - 2 / 6))
