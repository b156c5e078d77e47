import pytest
import torch

import nanosae
from nanosae import SAE, SAEConfig
from nanosae.errors import ConfigError
from nanosae.train import refit
from nanosae.train.losses import sae_loss
from nanosae.train.refit import DecoderRefit
from nanosae.train.schedule import Schedule, lr_at
from tests.train.test_trainer import cfg_for


def random_sae(arch: str, d_in=12, d_sae=40, k=5, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae.train()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_normal_equations_equal_the_dense_codes(arch):
    sae = random_sae(arch)
    refit = DecoderRefit(40, 12)
    Z, Y = [], []
    for seed in range(3):
        x = torch.randn(64, 12, generator=torch.Generator().manual_seed(seed))
        out = sae_loss(sae, x)
        vals, sel = out.codes
        refit.add(vals, sel, out.x)
        Z.append(sel.by_token(vals.detach()).to_dense().double())
        Y.append(out.x.double())
    if arch == "batchtopk":  # a token may hold any number of latents, none included
        counts = torch.diff(sel.offsets, append=sel.offsets.new_tensor([len(sel.rows)]))
        assert counts.min() != counts.max()
    Z1 = torch.cat([torch.cat(Z), torch.ones(192, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(refit.full_gram(), Z1.T @ Z1, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(refit.cross, Z1.T @ torch.cat(Y), rtol=1e-12, atol=1e-9)


def expected_decoder(Z, target, rows, bias):
    """The documented refit written out densely: least squares over the fired latents' codes and a bias column,
    each latent pulled to its trained row with weight PRIOR × mean(diag), the bias with a RIDGE-relative one."""
    fired = Z.count_nonzero(0) > 0
    A = torch.cat([Z[:, fired], torch.ones(len(Z), 1, dtype=torch.float64)], 1)
    gram = A.T @ A
    weight = torch.full((len(gram),), refit.PRIOR * float(gram.diagonal()[:-1].mean().detach()), dtype=torch.float64)
    weight[-1] = refit.RIDGE * len(Z)
    trained = torch.cat([rows[fired], bias[None]]).double()
    solution = torch.linalg.solve(gram + torch.diag(weight), A.T @ target.double() + weight[:, None] * trained)
    return fired, solution[:-1], solution[-1]


def test_apply_is_the_least_squares_decoder_and_keeps_the_encoder():
    sae = random_sae("topk").eval()
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(1))
    fit = DecoderRefit(40, 12)
    out = sae_loss(sae, x)
    fit.add(*out.codes, out.x)
    pre_before = sae.pre_acts(x)
    old_rows, old_bias = sae.W_dec.detach().clone(), sae.b_dec.detach().clone()
    fired, rows, bias = expected_decoder(sae.encode(x).double(), x, old_rows, old_bias)
    n = fit.apply(sae)
    assert n == int(fired.sum()) and n < 40  # some latents never fired: they keep their rows
    torch.testing.assert_close(sae.pre_acts(x), pre_before, rtol=1e-5, atol=1e-5)  # same codes, same latents picked
    assert torch.equal(sae.W_dec[~fired], old_rows[~fired])
    torch.testing.assert_close(sae.W_dec[fired].double(), rows, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.b_dec.double(), bias, rtol=1e-4, atol=1e-4)


def test_trained_decoder_is_the_least_squares_decoder_of_the_stored_codes(planted_store, tmp_path):
    """The same run without the refit gives the trained rows and the codes; the refit decoder must solve the
    normal equations over every stored token, pulled to those rows by the documented prior, written out here."""
    store, _ = planted_store
    x = store.tokens(0, len(store)).float()
    whole = dict(tokens=256 * 160)  # more than the store holds: the refit reads all of it once
    plain = nanosae.train(cfg_for(store, tmp_path / "plain", refit_decoder=False, **whole)).sae.eval()
    res = nanosae.train(cfg_for(store, tmp_path / "refit", **whole))  # on by default here
    sae = res.sae.eval()
    Z = plain.encode(x).double()
    torch.testing.assert_close(sae.encode(x).double(), Z, rtol=1e-4, atol=1e-4)  # the encoder's codes are kept
    fired, rows, bias = expected_decoder(Z, plain.normalize_input(x)[0], plain.W_dec, plain.b_dec)
    assert res.metrics["refit_latents"] == int(fired.sum())
    torch.testing.assert_close(sae.W_dec[fired].double(), rows, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(sae.b_dec.double(), bias, rtol=1e-3, atol=1e-4)
    refit_rows = sae.W_dec.norm(dim=1)
    assert not torch.allclose(refit_rows, torch.ones_like(refit_rows))  # the rows carry the codes' scale now
    again = nanosae.train(
        cfg_for(store, tmp_path / "refit", resume=True, **whole)
    ).sae  # a finished run: refit once only
    assert torch.equal(again.W_dec, res.sae.W_dec)


def test_decoder_steps_at_its_own_rate(planted_store, tmp_path):
    """Adam's first step moves every parameter by lr·sign(grad): b_dec by 3× what b_enc moves."""
    store, _ = planted_store
    cfg = cfg_for(store, tmp_path / "one", tokens=256, grad_clip=0, refit_decoder=False)
    d = Schedule.of(cfg)
    assert d.decoder_lr_scale == 3.0 and Schedule.of(cfg_for(store, "x", architecture="relu")).decoder_lr_scale == 1.0
    nanosae.train(cfg_for(store, tmp_path / "zero", tokens=256, grad_clip=0, lr=1e-12, refit_decoder=False))
    start = SAE.load(tmp_path / "zero" / "sae")
    end = nanosae.train(cfg).sae
    lr = lr_at(0, cfg, d)
    moved_dec = (end.b_dec - start.b_dec).abs()
    moved_enc = (end.b_enc - start.b_enc).abs()
    torch.testing.assert_close(moved_dec, torch.full_like(moved_dec, 3 * lr), rtol=1e-3, atol=1e-9)
    assert torch.allclose(moved_enc[moved_enc > 0], torch.tensor(lr), rtol=1e-3)


def test_defaults_and_refusals(planted_store):
    store, _ = planted_store
    on = lambda stored=True, **kw: refit.refit_applies(cfg_for(store, "x", **kw), stored)
    assert on() and not on(stored=False)  # a streamed run has nothing to read again
    assert not on(architecture="relu") and not on(d_sae=16384) and not on(kl_finetune=0.1)
    assert on(ema_decay=0.99)  # the refit reads the codes of the weights it saves, the average among them
    assert on(d_sae=16384, refit_decoder=True) and not on(refit_decoder=False)
    with pytest.raises(ConfigError, match="refit_decoder cannot be used here: .*kl_finetune"):
        on(refit_decoder=True, kl_finetune=0.1)
    with pytest.raises(ConfigError, match="refit_decoder cannot be used here: it is for topk and batchtopk"):
        on(refit_decoder=True, architecture="matryoshka")
    with pytest.raises(ConfigError, match="refit_decoder cannot be used here: it reads the stored activations"):
        on(stored=False, refit_decoder=True)


def test_batchtopk_is_refit_on_its_inference_codes(planted_store, tmp_path, arch="batchtopk"):
    store, _ = planted_store
    res = nanosae.train(cfg_for(store, tmp_path / arch, architecture=arch, tokens=256 * 60))
    sae = SAE.load(tmp_path / arch / "sae").eval()
    x = store.tokens(0, 256 * 60).float()  # what the refit read: the run's tokens, at most the store
    assert res.metrics["refit_latents"] == int((sae.encode(x).count_nonzero(0) > 0).sum())
    x = store.tokens(30_000, 40_000).float()
    held_out_fvu = float((sae(x)[0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert held_out_fvu < 0.5


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_finished_run_resumed_ends_with_the_same_weights(planted_store, tmp_path, arch):
    """EMA swap, BatchTopK calibration and the refit are derived again from the last checkpoint's training
    state: resuming a finished run (or one killed after its last checkpoint) changes nothing."""
    import shutil

    store, _ = planted_store
    cfg = dict(architecture=arch, ema_decay=0.9, tokens=256 * 40)
    first = nanosae.train(cfg_for(store, tmp_path / "run", **cfg)).sae
    again = nanosae.train(cfg_for(store, tmp_path / "run", resume=True, **cfg)).sae
    shutil.rmtree(tmp_path / "run" / "sae")  # killed after the last checkpoint, before the SAE was saved
    third = nanosae.train(cfg_for(store, tmp_path / "run", resume=True, **cfg)).sae
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]) and torch.equal(tensor, third.state_dict()[name]), name
