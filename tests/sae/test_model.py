import math

import pytest
import torch

from nanosae import SAE, ConfigError, SAEConfig, ShapeError
from nanosae.sae import jumprelu as act
from nanosae.train.losses import normalize_decoder, remove_parallel_grad, sae_loss

# A tiny hand-checkable SAE: d_in=2, d_sae=3.
W_ENC = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
B_ENC = torch.tensor([0.0, -1.0, 0.5], dtype=torch.float64)
B_DEC = torch.tensor([1.0, 0.0], dtype=torch.float64)
X = torch.tensor([[3.0, 2.0]], dtype=torch.float64)  # x - b_dec = [2, 2] -> pre = [2, 1, 0.5]


def tiny(arch, **kw):
    sae = SAE(SAEConfig(d_in=2, d_sae=3, architecture=arch, dtype="float64", **kw))
    with torch.no_grad():
        sae.W_enc.copy_(W_ENC)
        sae.b_dec.copy_(B_DEC)
        if arch != "gated":
            sae.b_enc.copy_(B_ENC)
    return sae


def test_relu_encode_hand_computed():
    assert torch.equal(tiny("relu").encode(X), torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64))


def test_apply_b_dec_to_input_off():
    # pre = [3, 2-1, -3+2+0.5] = [3, 1, -0.5]
    z = tiny("relu", apply_b_dec_to_input=False).encode(X)
    assert torch.equal(z, torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64))


def test_topk_keeps_exactly_k(device):
    assert torch.equal(tiny("topk", k=2).encode(X), torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64))
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=5, device=device))
    z = sae.encode(torch.randn(100, 16, device=device) * 3)
    assert ((z != 0).sum(-1) <= 5).all() and ((z != 0).sum(-1) == 5).float().mean() > 0.9
    # the kept ones are the largest pre-activations
    pre = sae.pre_acts(torch.randn(1, 16, device=device))
    z = sae.activate(pre)
    kept = z[0] != 0
    assert pre[0][kept].min() >= pre[0][~kept].max()


def test_batchtopk_training_and_inference():
    sae = tiny("batchtopk", k=1)
    x = torch.tensor([[3.0, 2.0], [1.0, 0.0]], dtype=torch.float64)  # pre rows [2, 1, .5], [0, -1, .5]
    sae.train()
    z = sae.encode(x)
    assert int((z != 0).sum()) == 2  # k * B across the batch, not per row
    assert torch.equal(z, torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.75)
    z = sae.encode(x)
    assert torch.equal(z, torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(sae.encode(x[1:]), torch.zeros(1, 3, dtype=torch.float64))  # per-token now


def test_batchtopk_threshold_estimated_in_training():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="batchtopk", k=4))
    sae.train()
    x = torch.randn(64, 8)
    sae_loss(sae, x)
    z = sae.encode(x)
    assert math.isclose(float(sae.threshold), float(z[z > 0].min().detach()), rel_tol=1e-6)


def test_calibrated_threshold_gives_exactly_k_per_token_on_the_sample():
    from nanosae.train.losses import calibrate_threshold

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="batchtopk", k=4, dtype="float64"))
    x = torch.randn(500, 8, dtype=torch.float64)
    threshold = calibrate_threshold(sae, x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert int((pre > threshold).sum()) == 4 * 500  # by hand: the pre-activations above it
    sae.eval()
    assert float((sae.encode(x) > 0).sum(-1).double().mean()) == 4.0


def test_jumprelu_encode_hand_computed():
    sae = tiny("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.5, 1.5, 0.1]))
    assert torch.equal(sae.encode(X), torch.tensor([[2.0, 0.0, 0.5]], dtype=torch.float64))


def test_gated_encode_hand_computed():
    sae = tiny("gated")
    with torch.no_grad():
        sae.b_gate.copy_(torch.tensor([0.0, -3.0, 0.0]))
        sae.r_mag.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))
        sae.b_mag.copy_(torch.tensor([1.0, 1.0, 1.0]))
    # pi_gate = [2, -1, 0] -> gate [1, 0, 0]; pi_mag = [3, 3, 1]
    assert torch.equal(sae.encode(X), torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64))


def test_jumprelu_pseudo_derivatives():
    eps = 0.001
    pre = torch.tensor([[1.0004, 2.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    act.jumprelu(pre, theta, eps).sum().backward()
    assert torch.allclose(pre.grad, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(theta.grad, torch.tensor([-1.0 / eps, 0.0], dtype=torch.float64))
    pre.grad = theta.grad = None
    act.step(pre, theta, eps).sum().backward()
    assert pre.grad is None  # the step passes no gradient to the pre-activations
    assert torch.allclose(theta.grad, torch.tensor([-1.0 / eps, 0.0], dtype=torch.float64))


def test_jumprelu_l0_loss_reaches_threshold():
    sae = tiny("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.9996, 5.0, 5.0]))  # pre[0] = 2 sits inside the kernel
    parts = sae_loss(sae, X, sparsity_coefficient=1.0).parts
    assert float(parts["l0"]) == 1.0
    parts["l0"].backward()
    assert torch.allclose(sae.threshold.grad, torch.tensor([-1000.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("target, penalty, grad", [(1.0, 2.0, -4000.0), (3.0, 2 / 3, 4000 / 3), (2.0, 0.0, 0.0)])
def test_jumprelu_target_l0_penalty_hand_computed(target, penalty, grad):
    sae = tiny("jumprelu", target_l0=target)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.9996, 0.5, 5.0]))  # pre = [2, 1, 0.5]: L0 = 2, pre[0] in the kernel
    parts = sae_loss(sae, X, sparsity_coefficient=3.0).parts
    assert float(parts["l0"]) == pytest.approx(3.0 * penalty)  # 3 · 2/t·(L0 − t)²
    parts["l0"].backward()
    # d/dθ0 = 3 · 4/t·(L0 − t) · dL0/dθ0, with dL0/dθ0 = −1/ε: above the target θ0 is pushed up, below it down
    expected = torch.tensor([3.0 * grad, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(sae.threshold.grad, expected)


def test_target_l0_is_refused_beside_another_sparsity():
    with pytest.raises(ConfigError, match="target_l0 is for jumprelu SAEs; a topk SAE's L0 is set by its k"):
        SAEConfig(d_in=2, d_sae=3, architecture="topk", k=1, target_l0=2.0)
    with pytest.raises(ConfigError, match="target_l0"):
        SAEConfig(d_in=2, d_sae=3, architecture="jumprelu", target_l0=4.0)  # more than d_sae


def test_gated_gradients_flow_as_specified():
    sae = SAE(SAEConfig(d_in=6, d_sae=12, architecture="gated"))
    x = torch.randn(32, 6)
    parts = sae_loss(sae, x, sparsity_coefficient=0.1).parts
    parts["mse"].backward(retain_graph=True)
    # the reconstruction trains the magnitude path, never the gate bias (Heaviside has no gradient)
    assert sae.b_gate.grad is None or torch.count_nonzero(sae.b_gate.grad) == 0
    assert torch.count_nonzero(sae.b_mag.grad) > 0 and torch.count_nonzero(sae.r_mag.grad) > 0
    sae.zero_grad()
    parts["aux"].backward(retain_graph=True)
    # the auxiliary loss trains the gate through a frozen decoder
    assert torch.count_nonzero(sae.b_gate.grad) > 0
    assert sae.W_dec.grad is None or torch.count_nonzero(sae.W_dec.grad) == 0


def test_relu_l1_weighted_by_decoder_norms():
    sae = tiny("relu")
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))  # norms 2, 1, 5
    parts = sae_loss(sae, X, sparsity_coefficient=0.5).parts
    assert math.isclose(float(parts["l1"]), 0.5 * (2 * 2 + 1 * 1 + 0.5 * 5))
    x_hat = torch.tensor([2.0, 0.0]) * 2 + torch.tensor([0.0, 1.0]) + torch.tensor([3.0, 4.0]) * 0.5 + B_DEC
    assert math.isclose(float(parts["mse"]), float(((x_hat - X[0]) ** 2).sum()))


def test_auxk_uses_only_dead_latents():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    x = torch.randn(10, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    parts = sae_loss(sae, x, dead_mask=dead, k_aux=4, fast=False).parts
    parts["auxk"].backward()
    rows_with_grad = sae.W_dec.grad.abs().sum(1) > 0
    assert set(rows_with_grad.nonzero().flatten().tolist()) == {3, 7}
    # by hand: residual reconstructed from the two dead latents (k_aux capped at the dead count)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        z = sae.activate(pre)
        residual = x - (z @ sae.W_dec + sae.b_dec)
        aux = torch.zeros_like(pre)
        aux[:, [3, 7]] = pre[:, [3, 7]].relu()
        expected = ((aux @ sae.W_dec - residual) ** 2).sum(-1).mean() / 32
    assert torch.allclose(parts["auxk"], expected, rtol=1e-5)
    assert "auxk" not in sae_loss(sae, x, dead_mask=torch.zeros(16, dtype=torch.bool)).parts


def test_decoder_projection_keeps_unit_norm():
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="relu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    sae_loss(sae, x, sparsity_coefficient=1e-3).loss.backward()
    remove_parallel_grad(sae)
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6)
    opt.step()
    normalize_decoder(sae)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_projection_removes_first_order_norm_change():
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="relu"))
    sae_loss(sae, torch.randn(64, 16), sparsity_coefficient=1e-3).loss.backward()
    raw = sae.W_dec.grad.clone()
    remove_parallel_grad(sae)
    lr = 1e-3
    with torch.no_grad():
        drift_projected = ((sae.W_dec - lr * sae.W_dec.grad).norm(dim=1) - 1).abs().max()
        drift_raw = ((sae.W_dec - lr * raw).norm(dim=1) - 1).abs().max()
    assert drift_projected < drift_raw / 100


def test_layer_norm_and_scale_are_undone(device):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu", normalize_activations="layer_norm", device=device))
    x = torch.randn(4, 8, device=device) * 5 + 3
    x_hat, z = sae(x)
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    z_ref = ((xn - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    assert torch.allclose(z, z_ref, atol=1e-6)
    assert torch.allclose(x_hat, (z_ref @ sae.W_dec + sae.b_dec) * std + mu, atol=1e-5)
    scaled = SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu", activation_scale=0.5, device=device))
    z = scaled.encode(x)
    assert torch.allclose(z, ((x * 0.5 - scaled.b_dec) @ scaled.W_enc + scaled.b_enc).relu(), atol=1e-6)
    assert torch.allclose(scaled.decode(z), (z @ scaled.W_dec + scaled.b_dec) / 0.5, atol=1e-6)


def test_splice_error_term(device):
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4, device=device))
    x = torch.randn(5, 8, device=device)
    assert torch.allclose(sae.splice(x), sae(x)[0])  # without error term: the reconstruction
    sae.use_error_term = True
    assert torch.allclose(sae.splice(x), x, atol=1e-6)  # with it: exact until an edit
    z = sae.encode(x)
    j = int(z[0].argmax())

    def ablate(module, inputs, out):
        out = out.clone()
        out[..., j] = 0
        return out

    handle = sae.hook_sae_acts_post.register_forward_hook(ablate)
    try:
        edited = sae.splice(x)
    finally:
        handle.remove()
    expected = x - z[:, j : j + 1] * sae.W_dec[j]
    assert torch.allclose(edited, expected, atol=1e-5)


def test_wrong_d_in_is_a_shape_error():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu"))
    with pytest.raises(ShapeError, match="expected d_in=8"):
        sae.encode(torch.randn(2, 9))


@pytest.mark.parametrize(
    "bad",
    [
        dict(architecture="nope"),
        dict(architecture="topk"),
        dict(architecture="topk", k=99),
        dict(d_sae=0),
        dict(normalize_activations="weird"),
    ],
)
def test_bad_config(bad):
    kw = dict(d_in=4, d_sae=8, architecture="relu") | bad
    with pytest.raises(ConfigError):
        SAEConfig(**kw)


def test_matryoshka_prefix_losses_hand_computed():
    sae = SAE(
        SAEConfig(
            d_in=2,
            d_sae=4,
            architecture="matryoshka",
            k=4,
            matryoshka_groups=[1, 2],
            dtype="float64",
            apply_b_dec_to_input=False,
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.5]]))
        sae.b_dec.copy_(torch.tensor([0.1, 0.2]))
    assert sae.cfg.matryoshka_groups == [1, 2, 4]
    sae.train()
    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64)  # z = [2, 3, 2, 3] (k*B = 4 keeps all)
    parts = sae_loss(sae, x).parts
    # prefix 1: 2*[1,0] + b = [2.1, .2] -> err [-.1, 2.8]; prefix 2: [2.1, 3.2] -> [-.1, -.2];
    # all 4: [2.1 + 1, 3.2 + 1.5] = [3.1, 4.7] -> [-1.1, -1.7]
    assert float(parts["mse_1"]) == pytest.approx(0.01 + 7.84)
    assert float(parts["mse_2"]) == pytest.approx(0.01 + 0.04)
    assert float(parts["mse"]) == pytest.approx(1.21 + 2.89)
    assert float(sae_loss(sae, x).loss) == pytest.approx(7.85 + 0.05 + 4.10)


def test_matryoshka_default_groups_and_inference_threshold():
    sae = SAE(SAEConfig(d_in=8, d_sae=64, architecture="matryoshka", k=4))
    assert sae.cfg.matryoshka_groups == [8, 16, 32, 64]
    sae.train()
    sae_loss(sae, torch.randn(32, 8))
    assert float(sae.threshold) > 0
    sae.eval()
    z = sae.encode(torch.randn(5, 8))
    assert ((z == 0) | (z > float(sae.threshold))).all()


def test_layer_norm_state_is_passed_explicitly():
    """decode() keeps no state from the last encode(): a layer-norm SAE's decode needs the norm of its own
    inputs, and two interleaved encodes cannot mix them up."""
    from nanosae.errors import ConfigError

    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, normalize_activations="layer_norm"))
    a, b = torch.randn(5, 16) * 3 + 1, torch.randn(5, 16) * 0.1 - 2
    za, norm_a = sae.encode(a, return_norm=True)
    sae.encode(b)  # another input in between changes nothing
    x_hat, _ = sae(a)
    assert torch.allclose(sae.decode(za, norm_a), x_hat, atol=1e-6)
    mu, std = a.mean(-1, keepdim=True), (a - a.mean(-1, keepdim=True)).std(-1, keepdim=True)
    assert torch.allclose(sae.decode(za, norm_a), (za @ sae.W_dec + sae.b_dec) * std + mu, atol=1e-5)
    with pytest.raises(ConfigError, match="needs the norm state"):
        sae.decode(za)


def test_every_architecture_has_one_activation():
    from nanosae import registry

    assert {"relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"} <= set(registry.names())
    assert all(callable(registry.get(name).activate) for name in registry.names())


def test_encoder_is_held_latent_major_in_its_own_memory():
    """W_enc is (d_in, d_sae) but stored latent-major, like W_dec, so the sparse backward's gradient needs no
    transposed copy; it is tied to W_dec.T in value only, never in memory."""
    from nanosae.train.losses import sae_loss

    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    assert sae.W_enc.shape == (8, 16) and sae.W_enc.stride() == (1, 8)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.untyped_storage().data_ptr() != sae.W_dec.untyped_storage().data_ptr()
    sae_loss(sae, torch.randn(32, 8)).loss.backward()
    assert sae.W_enc.grad.stride() == (1, 8)
