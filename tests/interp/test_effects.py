"""A feature's measured output effect against the same ablation done by hand."""

import torch

from nanosae import SAE, SAEConfig
from nanosae.interp.effects import effect_summary, measured_effect

HOOK = "blocks.1.hook_resid_post"


def test_the_measured_effect_is_the_ablation_done_by_hand(tiny_model):
    torch.manual_seed(5)
    sae = SAE(SAEConfig(d_in=32, d_sae=24, architecture="topk", k=3, hook_name=HOOK))
    windows = [[5, 9, 12, 7, 30, 31, 8], [40, 41, 42, 43, 5, 9], [11, 12, 13]]
    bos = tiny_model.tokenizer.bos_id
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(torch.tensor([[bos, *windows[0]]]), [HOOK])
        latent = int(sae.encode(cache[HOOK])[0, 1:].sum(0).argmax())
        max_act = float(sae.encode(cache[HOOK])[0, 1:, latent].max())
    got = measured_effect(tiny_model, sae, latent, windows, max_act)
    total, n = torch.zeros(tiny_model.module.config.vocab_size), 0
    for ids in windows:
        tokens = torch.tensor([[bos, *ids]])
        with torch.no_grad():
            clean, cache = tiny_model.run_with_cache(tokens, [HOOK])
            z = sae.encode(cache[HOOK])[0, :, latent]

            def remove(y):  # the latent's own part of the reconstruction, taken out of the residual
                return y - sae.encode(y)[..., latent, None] * sae.W_dec[latent]

            with tiny_model.hooks({HOOK: remove}):
                ablated = tiny_model.forward(tokens)
        for p in range(1, tokens.shape[1]):
            if z[p] >= 0.25 * max_act:
                total += clean[0, p].log_softmax(-1) - ablated[0, p].log_softmax(-1)
                n += 1
    assert n > 0 and got.positions == n
    assert torch.allclose(got.mean, total / n, atol=1e-5)


def test_the_summary_puts_the_logit_lens_beside_the_measured_effect(viewer_run, tiny_model):
    from nanosae.interp.featuredb import FeatureDB

    sae = SAE.load(viewer_run / "sae")
    db = FeatureDB(viewer_run)
    latent = max(range(24), key=lambda i: db.latent(i)["fires"])
    s = effect_summary(tiny_model, sae, db, latent)
    assert len(s["promoted"]) == 10 and len(s["suppressed"]) == 10 and s["positions"] > 0
    assert s["promoted"][0][1] >= s["promoted"][-1][1] and s["suppressed"][0][1] <= s["suppressed"][-1][1]
    assert 0 <= s["lens_top_overlap"] <= 10 and -1 <= s["lens_correlation"] <= 1
