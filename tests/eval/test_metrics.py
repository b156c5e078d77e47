import pytest
import torch

from nanosae import SAE, DataConfig, SAEConfig
from nanosae.eval import evaluate
from nanosae.eval.metrics import _finish, _Sums
from nanosae.eval.report import write_report

HOOK = "blocks.1.hook_resid_post"


def data(word_corpus):
    return DataConfig(specs=[str(word_corpus)], context_size=16, split="eval")


def identity_sae(d):
    """z = [relu(x), relu(-x)], x_hat = relu(x) - relu(-x) = x exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_hand_computed_metrics(device):
    s = _Sums(d_in=2, d_sae=3, context=4)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=device)
    s.add(x, x_hat, z, torch.tensor([1, 2]))
    s.ce_sae, s.kl = 3.0, 0.5
    sae = SAE(SAEConfig(d_in=2, d_sae=3, architecture="relu"))
    r = _finish(s, sae, ["h"], ["h"], ce_clean=2.0, ce_abl=5.0, n_pred=2, ablation="zero")
    # errors [0, 1]; mean x = [.5, .5] so total variance = 2 * (.25 + .25) = 1
    assert r["fvu"] == pytest.approx(1.0) and r["explained_variance"] == pytest.approx(0.0)
    assert r["mse"] == pytest.approx(0.25)
    assert (r["l0"], r["l0_std"], r["l1"]) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert r["dead_fraction"] == pytest.approx(2 / 3) and r["dense_fraction"] == pytest.approx(1 / 3)
    assert r["cosine_similarity"] == pytest.approx(0.5) and r["relative_reconstruction_norm"] == pytest.approx(0.5)
    assert (r["ce_loss_clean"], r["ce_loss_with_sae"], r["ce_loss_with_ablation"]) == (1.0, 1.5, 2.5)
    assert r["ce_loss_score"] == pytest.approx((2.5 - 1.5) / (2.5 - 1.0)) and r["kl_div"] == 0.25
    assert r["l0_histogram"] == [1, 1]
    # position 1 holds x1 (error 0), position 2 holds x2 (error 1, variance .5)
    assert r["fvu_by_position"][:3] == [None, 0.0, pytest.approx(2.0)]


def test_identity_sae_is_perfect(tiny_model, word_corpus):
    r = evaluate(identity_sae(tiny_model.d_model), tiny_model, data(word_corpus), tokens=150)
    assert r["fvu"] < 1e-10 and r["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl_div"] < 1e-8 and r["cosine_similarity"] == pytest.approx(1.0)
    assert (
        abs(r["ce_loss_with_ablation"] - r["ce_loss_clean"]) > 1e-4 and 150 <= r["tokens"] < 150 + 16
    )  # stops within one window of the ask


def test_zero_sae_scores_zero(tiny_model, word_corpus):
    sae = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=8, architecture="relu", hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    r = evaluate(sae, tiny_model, data(word_corpus), tokens=300)
    assert r["ce_loss_score"] == pytest.approx(0.0, abs=1e-9) and r["l0"] == 0 and r["dead_fraction"] == 1.0
    assert r["fvu"] >= 1.0  # predicting zero is no better than predicting the mean
    mean = evaluate(sae, tiny_model, data(word_corpus), tokens=300, ablation="mean")
    assert mean["ablation"] == "mean" and mean["ce_loss_with_ablation"] != r["ce_loss_with_ablation"]


def test_error_term_splice_keeps_logits(tiny_model):
    sae = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=64, architecture="topk", k=4, hook_name=HOOK))
    toks = torch.randint(3, 64, (2, 12))
    clean = tiny_model.forward(toks)
    sae.use_error_term = True
    with tiny_model.hooks({HOOK: sae.splice}):
        spliced = tiny_model.forward(toks)
    assert torch.allclose(spliced, clean, atol=1e-5)
    sae.use_error_term = False
    with tiny_model.hooks({HOOK: sae.splice}):
        assert not torch.allclose(tiny_model.forward(toks), clean, atol=1e-3)


def test_several_saes_share_the_clean_pass(tiny_model, word_corpus, monkeypatch):
    a = identity_sae(tiny_model.d_model)
    b = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=64, architecture="topk", k=4, hook_name=HOOK))
    calls = []
    real = tiny_model._logits
    monkeypatch.setattr(tiny_model, "_logits", lambda t: calls.append(1) or real(t))
    both = evaluate([a, b], tiny_model, data(word_corpus), tokens=200, batch_size=64)
    n_batches = len(calls) // 4  # clean + one ablation (one hook) + one spliced pass per SAE
    assert len(calls) == 4 * n_batches and n_batches >= 1
    alone = evaluate(b, tiny_model, data(word_corpus), tokens=200, batch_size=64)
    for key in ("fvu", "ce_loss_score", "kl_div", "l0"):
        assert both[1][key] == pytest.approx(alone[key], rel=1e-9)


def test_report_has_the_plots(tiny_model, word_corpus, tmp_path):
    a = identity_sae(tiny_model.d_model)
    b = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=64, architecture="topk", k=4, hook_name=HOOK))
    results = evaluate([a, b], tiny_model, data(word_corpus), tokens=200)
    page = write_report(results, ["identity", "<b>topk</b>"], tmp_path / "report.html").read_text()
    assert all(r["l0_std"] == 0 for r in results)  # both fire a fixed number of latents per token
    assert page.count('src="data:image/png;base64,') == 4  # density, FVU by position, 2 frontiers; no L0 histogram
    assert "L0 per token" not in page and "divides the totals over all tokens" in page
    assert "Feature density" in page and "ce_loss_score" in page
    assert "<b>topk</b>" not in page and "&lt;b&gt;topk&lt;/b&gt;" in page
    relu = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=64, architecture="relu", hook_name=HOOK))
    results = evaluate([relu], tiny_model, data(word_corpus), tokens=200)
    page = write_report(results, ["relu"], tmp_path / "relu.html").read_text()
    assert results[0]["l0_std"] > 0 and "L0 per token" in page and page.count('src="data:image/png;base64,') == 3


def test_wrong_width_is_refused(tiny_model, word_corpus):
    with pytest.raises(Exception, match="expects d_in=7"):
        evaluate(SAE(SAEConfig(d_in=7, d_sae=8, architecture="relu", hook_name=HOOK)), tiny_model, data(word_corpus))


def test_ce_and_kl_match_a_direct_computation(tiny_model_on, word_corpus, device):
    """CE with the SAE spliced in and KL(clean ‖ spliced), against plain float64 log-softmaxes of full passes."""
    import torch.nn.functional as F

    from nanosae.data.corpus import iter_documents
    from nanosae.data.tokens import token_batches

    tiny_model = tiny_model_on
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=tiny_model.d_model, d_sae=64, architecture="topk", k=4, hook_name=HOOK, device=device))
    cfg = data(word_corpus)
    batch = next(
        token_batches(iter_documents(cfg), tiny_model.tokenizer, cfg.context_size, 8, cfg.pack, cfg.exclude_first)
    )
    r = evaluate(sae, tiny_model, cfg, tokens=int(batch.valid.sum()), batch_size=8)
    toks, valid = batch.tokens.to(device), batch.valid.to(device)
    keep = valid[:, :-1] & valid[:, 1:]
    clean, cache = tiny_model.run_with_cache(toks, [HOOK])
    spliced_acts = cache[HOOK].clone()
    with torch.no_grad():
        spliced_acts[valid] = sae(cache[HOOK][valid])[0]
    with tiny_model.hooks({HOOK: lambda _: spliced_acts}):
        spliced = tiny_model.forward(toks)
    logp, logq = (F.log_softmax(t[:, :-1].double(), -1)[keep] for t in (clean, spliced))
    target = toks[:, 1:][keep][:, None]
    assert r["tokens"] == int(valid.sum())
    assert r["ce_loss_clean"] == pytest.approx(float(-logp.gather(1, target).mean()), rel=1e-5)
    assert r["ce_loss_with_sae"] == pytest.approx(float(-logq.gather(1, target).mean()), rel=1e-5)
    kl = F.kl_div(logq, logp, reduction="batchmean", log_target=True)
    assert float(kl) > 1e-3 and r["kl_div"] == pytest.approx(float(kl), rel=1e-4, abs=1e-6)
