"""Transcoders and crosscoders are the SAE class with other inputs/outputs: shapes, losses by hand, files."""

import json

import pytest
import torch

from nanosae import SAE, SAEConfig
from nanosae.errors import ConfigError, ShapeError
from nanosae.export.saelens import saelens_sae
from nanosae.train.losses import sae_loss


def set_weights(sae: SAE, **tensors) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))


def test_transcoder_shapes_and_no_input_centring():
    cfg = SAEConfig(
        d_in=3,
        d_sae=5,
        d_out=2,
        architecture="relu",
        hook_name="blocks.0.ln2.hook_normalized",
        hook_name_out="blocks.0.hook_mlp_out",
        skip_connection=True,
    )
    assert cfg.kind == "transcoder" and cfg.apply_b_dec_to_input is False
    assert cfg.input_hooks == ["blocks.0.ln2.hook_normalized"] and cfg.output_hooks == ["blocks.0.hook_mlp_out"]
    sae = SAE(cfg)
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert shapes == {"W_enc": (3, 5), "W_dec": (5, 2), "b_dec": (2,), "b_enc": (5,), "W_skip": (2, 3)}
    x_hat, z = sae(torch.randn(7, 3))
    assert x_hat.shape == (7, 2) and z.shape == (7, 5)
    with pytest.raises(ShapeError, match="d_out=2"):
        sae_loss(sae, torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ShapeError, match="splice"):
        sae.splice(torch.randn(4, 3))


def test_transcoder_loss_by_hand():
    """y_hat = relu(x W_enc + b_enc) W_dec + b_dec + x W_skip^T; loss = Σ_out (y_hat − y)² + λ Σ z·‖W_dec‖."""
    sae = SAE(
        SAEConfig(d_in=2, d_sae=2, d_out=1, architecture="relu", hook_name="a", hook_name_out="b", skip_connection=True)
    )
    set_weights(
        sae, W_enc=[[1.0, -1.0], [2.0, 0.0]], b_enc=[0.0, 0.5], W_dec=[[3.0], [4.0]], b_dec=[1.0], W_skip=[[0.5, 0.0]]
    )
    x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([[20.0]])
    # pre = [1 + 2, -1 + 0.5] = [3, -0.5] -> z = [3, 0]; y_hat = 3·3 + 1 + 0.5·1 = 10.5
    out = sae_loss(sae, x, y, sparsity_coefficient=0.1, fast=False)
    assert float(out.parts["mse"]) == pytest.approx((20 - 10.5) ** 2)
    assert float(out.parts["l1"]) == pytest.approx(0.1 * 3 * 3.0)  # z·‖W_dec row‖ = 3·3
    x_hat, z = sae(x)
    assert z.tolist() == [[3.0, 0.0]] and float(x_hat) == pytest.approx(10.5)


def test_transcoder_sparse_path_equals_dense():
    torch.manual_seed(1)
    sae = SAE(
        SAEConfig(
            d_in=6,
            d_sae=40,
            d_out=4,
            architecture="topk",
            k=3,
            hook_name="a",
            hook_name_out="b",
            skip_connection=True,
            activation_scale=1.7,
            output_scale=0.6,
        )
    )
    with torch.no_grad():
        sae.W_skip.normal_()
        sae.b_dec.normal_()
    x, y = torch.randn(32, 6), torch.randn(32, 4)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:20] = True
    grads = []
    for fast in (True, False):
        sae.zero_grad()
        out = sae_loss(sae, x, y, dead_mask=dead, k_aux=5, fast=fast)
        out.loss.backward()
        grads.append((float(out.loss), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], atol=1e-4), name


def test_crosscoder_shapes_and_loss_by_hand():
    """Two layers of width 2 in and out, one shared latent space; the L1 weight sums the per-layer decoder norms."""
    cfg = SAEConfig(
        d_in=4, d_sae=2, architecture="relu", crosscoder_hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    )
    assert (
        cfg.kind == "crosscoder"
        and cfg.n_blocks == 2
        and cfg.d_out == 4
        and cfg.hook_name == "blocks.0.hook_resid_post"
    )
    sae = SAE(cfg)
    set_weights(
        sae,
        W_enc=[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]],
        b_enc=[0.0, 0.0],
        W_dec=[[3.0, 4.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]],
        b_dec=[0.0, 0.0, 0.0, 0.0],
    )
    x = torch.tensor([[2.0, 0.0, 1.0, 0.0]])  # layer 0 = (2, 0), layer 1 = (1, 0)
    # z = [2, 1]; x_hat = 2·[3, 4, 0, 1] + 1·[0, 0, 1, 0] = [6, 8, 1, 2]
    out = sae_loss(sae, x, sparsity_coefficient=0.5, fast=False)
    assert float(out.parts["mse"]) == pytest.approx(16 + 64 + 0 + 4)
    # decoder norms per latent: latent 0: ‖(3,4)‖ + ‖(0,1)‖ = 6; latent 1: ‖(0,0)‖ + ‖(1,0)‖ = 1
    assert sae.decoder_norms().tolist() == pytest.approx([6.0, 1.0])
    assert float(out.parts["l1"]) == pytest.approx(0.5 * (2 * 6 + 1 * 1))
    blocks = sae.output_blocks(sae(x)[0])
    assert list(blocks) == cfg.crosscoder_hooks
    assert blocks["blocks.0.hook_resid_post"].tolist() == [[6.0, 8.0]] and blocks[
        "blocks.1.hook_resid_post"
    ].tolist() == [[1.0, 2.0]]
    assert torch.equal(
        sae.gather_input({"blocks.0.hook_resid_post": x[:, :2], "blocks.1.hook_resid_post": x[:, 2:]}), x
    )


def test_crosscoder_scales_each_layer():
    sae = SAE(
        SAEConfig(d_in=4, d_sae=3, architecture="topk", k=1, crosscoder_hooks=["a", "b"], activation_scale=[2.0, 0.5])
    )
    assert sae.input_factor().tolist() == [2.0, 2.0, 0.5, 0.5]
    x = torch.randn(5, 4)
    x_norm, _ = sae.normalize_input(x)
    assert torch.allclose(x_norm, x * torch.tensor([2.0, 2.0, 0.5, 0.5]))
    with pytest.raises(ConfigError, match="one per input block"):
        SAEConfig(d_in=4, d_sae=3, crosscoder_hooks=["a", "b"], activation_scale=[1.0, 1.0, 1.0], k=1)


def test_bad_combinations_are_refused():
    with pytest.raises(ConfigError, match="only a transcoder"):
        SAEConfig(d_in=4, d_sae=8, d_out=3, k=2)
    with pytest.raises(ConfigError, match="skip_connection"):
        SAEConfig(d_in=4, d_sae=8, k=2, skip_connection=True)
    with pytest.raises(ConfigError, match="divisible"):
        SAEConfig(d_in=5, d_sae=8, k=2, crosscoder_hooks=["a", "b"])
    with pytest.raises(ConfigError, match="not both"):
        SAEConfig(d_in=4, d_sae=8, k=2, crosscoder_hooks=["a", "b"], hook_name_out="c")


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_transcoder_files_use_saelens_names_and_fold_scaling(tmp_path, arch):
    """Saved with SAELens's architecture names; the SAELens export folds the scaling so SAELens's own forward
    (no scaling: relu(x W_enc + b_enc) W_dec + b_dec + x W_skip^T) gives our output."""
    torch.manual_seed(3)
    sae = SAE(
        SAEConfig(
            d_in=6,
            d_sae=16,
            d_out=4,
            architecture=arch,
            hook_name="blocks.2.ln2.hook_normalized",
            hook_name_out="blocks.2.hook_mlp_out",
            skip_connection=arch == "relu",
            activation_scale=2.5,
            output_scale=0.4,
        )
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.save(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert raw["architecture"] == ("skip_transcoder" if arch == "relu" else "jumprelu_transcoder")
    assert raw["d_out"] == 4 and raw["hook_name_out"] == "blocks.2.hook_mlp_out" and raw["hook_layer_out"] == 2
    loaded = SAE.load(tmp_path / "ours")
    assert loaded.cfg == sae.cfg
    x = torch.randn(10, 6)
    folded = saelens_sae(sae)
    assert folded.cfg.activation_scale == 1.0 and folded.cfg.output_scale is None
    W = folded.state_dict()
    pre = x @ W["W_enc"] + W["b_enc"]
    z = pre.relu() if arch == "relu" else pre * (pre > W["threshold"])
    reference = z @ W["W_dec"] + W["b_dec"] + (x @ W["W_skip"].T if "W_skip" in W else 0)
    assert torch.allclose(reference, sae(x)[0], atol=1e-5)


def test_saelens_export_folds_a_plain_sae_scale():
    """An SAE trained with activation scaling runs in SAELens (which ignores our activation_scale) unchanged."""
    torch.manual_seed(4)
    sae = SAE(SAEConfig(d_in=6, d_sae=16, architecture="relu", activation_scale=3.0))
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(10, 6)
    W = saelens_sae(sae).state_dict()
    reference = ((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]).relu() @ W["W_dec"] + W["b_dec"]
    assert torch.allclose(reference, sae(x)[0], atol=1e-5)


def test_crosscoder_has_no_saelens_export():
    sae = SAE(SAEConfig(d_in=4, d_sae=3, k=1, crosscoder_hooks=["a", "b"]))
    with pytest.raises(ConfigError, match="no crosscoder"):
        saelens_sae(sae)
