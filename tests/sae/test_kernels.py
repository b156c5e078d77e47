"""The sparse training path equals the dense reference: same loss values and the same gradients."""

import pytest
import torch

from nanosae import SAE, SAEConfig
from nanosae.sae import kernels
from nanosae.train.losses import sae_loss


def grads(sae, x, **kw):
    sae.zero_grad()
    out = sae_loss(sae, x, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 8, 30])  # 8 < k_aux: AuxK uses every dead latent; 30 > k_aux: the top 12
@pytest.mark.parametrize("norm_weighting", [0.0, 0.7])
@pytest.mark.parametrize("rows_sum", ["embedding_bag", "csr"])
def test_fast_path_equals_dense(arch, n_dead, norm_weighting, rows_sum, device, monkeypatch):
    monkeypatch.setitem(kernels.ROWS_SUM, device, rows_sum)
    sae = SAE(SAEConfig(d_in=24, d_sae=96, architecture=arch, k=6, dtype="float64", device=device))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    sae.train()
    x = torch.randn(40, 24, dtype=torch.float64).to(device) * 2
    with_dead = n_dead > 0
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True
    dead = dead.to(device)
    kw = dict(dead_mask=dead if with_dead else None, k_aux=12, norm_weighting=norm_weighting)
    fast, g_fast = grads(sae, x, fast=True, **kw)
    dense, g_dense = grads(sae, x, fast=False, **kw)
    assert fast.parts.keys() == dense.parts.keys() and ("auxk" in fast.parts) == with_dead
    for name in fast.parts:
        assert torch.allclose(fast.parts[name], dense.parts[name], rtol=1e-10), name
    if with_dead:  # AuxK by its definition over all latents: live ones masked out, the top k_aux (or all dead) kept
        with torch.no_grad():
            x_norm = x * sae.input_factor()
            pre = (x_norm - sae.b_dec) @ sae.W_enc + sae.b_enc
            vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(12, n_dead), dim=-1)
            residual_hat = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ sae.W_dec
            expected = (residual_hat - (x_norm - dense.x_hat)).pow(2).sum(-1).mean() / 32
        assert torch.allclose(fast.parts["auxk"], expected, rtol=1e-10)
    assert torch.equal(fast.fired, dense.fired)
    assert torch.allclose(fast.x_hat, dense.x_hat, atol=1e-10)
    assert g_fast.keys() == g_dense.keys() == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g_fast:
        assert torch.allclose(g_fast[name], g_dense[name], atol=1e-10), name


def test_norm_weighting_by_hand():
    """Two tokens with squared norms 1 and 4 (mean 2.5): weights (1/2.5)^-1, (4/2.5)^-1 = 2.5, 0.625, over
    their mean 1.5625 = 1.6, 0.4; the loss is the weighted mean of the squared errors."""
    sae = SAE(SAEConfig(d_in=2, d_sae=4, architecture="topk", k=1, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()  # every latent 0: x_hat = b_dec = 0
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    for fast in (True, False):
        out = sae_loss(sae, x, norm_weighting=1.0, fast=fast)
        assert float(out.parts["mse"]) == pytest.approx((1.6 * 1 + 0.4 * 4) / 2)
        assert float(sae_loss(sae, x, fast=fast).parts["mse"]) == pytest.approx((1 + 4) / 2)


def test_batchtopk_fast_keeps_exactly_kB():
    sae = SAE(SAEConfig(d_in=8, d_sae=64, architecture="batchtopk", k=3))
    sae.train()
    out = sae_loss(sae, torch.randn(10, 8))
    assert int(out.fired.sum()) <= 30 and int(out.fired.sum()) >= 25  # k*B selected, minus any non-positive


@pytest.mark.parametrize("n_dead", [5, 40])  # fewer dead than k_aux (all of them per token), and more
def test_auxk_selection_over_chunks_is_the_masked_topk(n_dead):
    """The chunked encoder's AuxK selection, chunk by chunk, equals topk over the dead columns of the full
    pre-activations (live ones masked to -inf)."""
    from nanosae.sae import kernels

    torch.manual_seed(n_dead)
    xc, W, b = torch.randn(50, 16), torch.randn(16, 80), torch.randn(80)
    dead = torch.randperm(80)[:n_dead].sort().values
    sel, aux = kernels.encode_select_topk(xc, W, b, k=4, chunk=7, dead=dead, k_aux=10)
    pre = xc @ W + b
    masked = torch.full_like(pre, float("-inf"))
    masked[:, dead] = pre[:, dead]
    vals, idx = masked.topk(min(10, n_dead), dim=-1)
    assert torch.equal(aux.rows, torch.arange(50).repeat_interleave(min(10, n_dead)))
    got = torch.sparse_coo_tensor(torch.stack([aux.rows, aux.cols]), aux.pre, (50, 80)).to_dense()
    want = torch.zeros(50, 80).scatter(1, idx, vals)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(sel.cols.view(50, 4).sort(-1).values, pre.topk(4, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_encoder_in_bfloat16_picks_nearly_the_same_latents(arch, device):
    """The bfloat16 encoder GEMM changes only near-ties: the loss stays within bfloat16's precision of the
    float32 one and the gradients keep their direction; the weights stay float32."""
    sae = SAE(SAEConfig(d_in=64, d_sae=256, architecture=arch, k=8, device=device))
    sae.train()
    x = torch.randn(128, 64, device=device)
    exact, g_exact = grads(sae, x)
    half, g_half = grads(sae, x, encoder_bf16=True)
    assert torch.allclose(half.loss, exact.loss, rtol=2e-2)
    for name in g_exact:
        assert g_half[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g_half[name].flatten(), g_exact[name].flatten(), dim=0)
        assert cos > 0.9, (name, float(cos))


def test_sums_in_a_fixed_order_equal_index_add(device):
    """The GPU's deterministic sums (stable sort + segments) equal index_add_'s, empty indices included, and the
    same call twice gives the same bits."""
    index = torch.randint(0, 50, (5000,), device=device)
    index[index == 7] = 8  # index 7 never occurs
    values = torch.randn(5000, dtype=torch.float64, device=device)
    expected = torch.zeros(50, dtype=torch.float64, device=device).index_add_(0, index, values)
    got = kernels.sorted_sum(index, values, 50)
    assert torch.allclose(got, expected, atol=1e-12) and got[7] == 0
    assert torch.equal(got, kernels.sorted_sum(index, values, 50))
    assert torch.equal(kernels.count(index, 50), torch.bincount(index, minlength=50))
    assert torch.equal(kernels.count(index, 50, values > 0), torch.bincount(index[values > 0], minlength=50))
    target = torch.ones(50, dtype=torch.float64, device=device)
    assert torch.allclose(kernels.index_add_exact(target, index, values), expected + 1, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_topk_step_on_cuda_never_waits_for_the_gpu():
    """No host synchronisation inside a TopK training step (a sync makes a small step launch-bound)."""
    from nanosae.train.losses import sae_loss

    sae = SAE(SAEConfig(d_in=64, d_sae=512, architecture="topk", k=8, device="cuda"))
    x = torch.randn(256, 64, device="cuda")
    sae_loss(sae, x).loss.backward()  # warm-up: first calls may sync (allocator, cuBLAS handles)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sae_loss(sae, x).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
