"""What training minimises, and the steps that keep an SAE trainable: the loss of each architecture (sparse
kernels for TopK/BatchTopK), AuxK for dead latents, BatchTopK's inference threshold, unit-norm decoder rows.

Squared errors are summed over the output and averaged over tokens, in the SAE's normalised space.
  relu      mse + λ·Σ z_i‖W_dec,i‖                       (L1 weighted by decoder norms)
  jumprelu  mse + λ·Σ H(pre_i − θ_i)                     (L0 through the step's pseudo-derivative)
  gated     mse + λ·Σ ReLU(π_gate)_i‖W_dec,i‖ + aux       (aux: the gate path reconstructs on its own)
  topk, batchtopk, matryoshka: mse (+ each matryoshka prefix's mse) + AuxK on the dead latents
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from nanosae.registry import LossInputs
from nanosae.sae import SAE, kernels
from nanosae.sae.architectures import squared_error
from nanosae.sae.topk import topk_rows
from nanosae.train.schedule import default_k_aux


class LossOutput(NamedTuple):
    loss: Tensor
    parts: dict[str, Tensor]
    fired: Tensor  # (d_sae,) how many tokens of the batch each latent fired on
    x_hat: Tensor  # reconstruction in the normalised space (detached)
    x: Tensor  # the normalised target (the input itself, except for transcoders)
    codes: tuple[Tensor, kernels.Selection] | None = None  # the sparse path's latent values (with grad) and places


def sae_loss(
    sae: SAE,
    x: Tensor,
    target: Tensor | None = None,
    *,
    k: int | None = None,
    sparsity_coefficient: float = 0.0,
    dead_mask: Tensor | None = None,
    k_aux: int | None = None,
    aux_coefficient: float = 1 / 32,
    norm_weighting: float = 0.0,
    fast: bool = True,
    encoder_bf16: bool = False,
    added: Tensor | None = None,
) -> LossOutput:
    """Training loss and its parts for a batch x (B, d_in).

    target (B, d_out) is what a transcoder predicts; SAEs and crosscoders reconstruct x itself.
    k: this step's k for the TopK family (k annealing), default the SAE's.
    sparsity_coefficient is the L1 weight (relu, gated) or the L0 weight (jumprelu).
    dead_mask (d_sae,) enables the AuxK loss (topk/batchtopk/matryoshka): the k_aux largest dead latents
    reconstruct the residual error (Gao et al. 2024). norm_weighting p weights each token's squared error by
    (‖y‖² / batch mean ‖y‖²)^−p, normalised to mean 1 (0: plain MSE). fast uses the sparse kernels for topk/batchtopk
    (same values and gradients as the dense path, far fewer FLOPs). encoder_bf16: the sparse path's encoder GEMM
    (which picks the latents and gives their values) in bfloat16; weights and gradients stay in their dtype.
    added (B, d_out): a prediction made elsewhere, in the normalised output space, added to this SAE's before
    the error is taken (a cross-layer transcoder's earlier layers writing into this one; gradients flow to it).
    """
    x_norm, _ = sae.normalize_input(sae.check_input(x))
    y = x_norm if target is None else sae.normalize_target(target)
    arch, k = sae.arch, sae.cfg.k if k is None else k
    k_aux = k_aux or default_k_aux(sae.cfg.d_in)
    dead = dead_mask.nonzero().squeeze(1) if dead_mask is not None and bool(dead_mask.any()) else None
    if fast and arch.sparse is not None and not x_norm.requires_grad:  # the input's gradient needs the dense path
        xc = sae.centre(x_norm).detach()
        sel, aux = arch.sparse(sae, xc, k, dead, k_aux, torch.bfloat16 if encoder_bf16 else None)
        out = sparse_loss(sae, x_norm, xc, y, sel, aux, aux_coefficient, norm_weighting, added)
        if arch.selection == "batch" and sae.training:
            update_threshold(sae, vals_of(out).detach())
        return out
    pre = sae.pre_acts(x_norm)
    z = sae.activate(pre, x_norm, k)
    skip = sae.skip(x_norm)
    x_hat = z @ sae.W_dec + sae.b_dec + skip
    if added is not None:
        x_hat = x_hat + added
    weights = token_weights(y, norm_weighting)
    parts = {"mse": squared_error(x_hat, y, weights)}
    if arch.loss_terms is not None:
        parts |= arch.loss_terms(sae, LossInputs(x_norm, y, pre, z, x_hat, skip, added, weights, sparsity_coefficient))
    if dead is not None and arch.dead_latents == "auxk":
        parts["auxk"] = aux_coefficient * auxk_loss(sae, pre[:, dead], dead, y - x_hat.detach(), k_aux)
    if arch.selection == "batch" and sae.training:
        update_threshold(sae, z)
    return LossOutput(sum_parts(parts), parts, (z > 0).sum(0), x_hat.detach(), y)


def sum_parts(parts: dict[str, Tensor]) -> Tensor:
    """The loss: its parts added in order."""
    return functools.reduce(operator.add, parts.values())


def vals_of(out: LossOutput) -> Tensor:
    """The sparse path's selected latent values (with grad)."""
    assert out.codes is not None
    return out.codes[0]


def token_weights(y: Tensor, power: float) -> Tensor | None:
    """Per-token weights (‖y‖² / mean ‖y‖²)^−power with mean 1: a few huge-norm tokens (attention sinks,
    outlier dimensions) dominate a plain MSE, while the model's predictions depend on the ordinary ones."""
    if not power:
        return None
    sq = y.detach().float().pow(2).sum(-1)
    w = (sq / sq.mean().clamp_min(1e-12)).clamp_min(1e-6).pow(-power)
    return (w / w.mean()).to(y.dtype)


def sparse_loss(
    sae: SAE,
    x_norm: Tensor,
    xc: Tensor,
    y: Tensor,
    sel: kernels.Selection,
    aux: kernels.Selection | None,
    aux_coefficient: float,
    norm_weighting: float = 0.0,
    added: Tensor | None = None,
    total: Callable[[Tensor], Tensor] | None = None,
) -> LossOutput:
    """The TopK family's loss from its selections (the latents each token keeps, and AuxK's among the dead
    ones), through the sparse kernels. total(partial): the whole reconstruction from this process's part, with
    latents sharded over processes (b_dec's gradient through the encoder is then added by the caller)."""
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input and total is None else None
    total = total or (lambda t: t)
    vals = kernels.selected_preacts(xc, sae.W_enc, sae.b_enc, b_dec, sel).relu()
    x_hat = total(kernels.sparse_decode(vals, sel, sae.W_dec)) + sae.b_dec + sae.skip(x_norm)
    if added is not None:
        x_hat = x_hat + added
    parts = {"mse": squared_error(x_hat, y, token_weights(y, norm_weighting))}
    if aux is not None:  # AuxK through the same sparse kernels: the dead latents' top k_aux reconstruct the residual
        aux_vals = kernels.selected_preacts(xc, sae.W_enc, sae.b_enc, b_dec, aux).relu()
        residual_hat = total(kernels.sparse_decode(aux_vals, aux, sae.W_dec))
        parts["auxk"] = aux_coefficient * (residual_hat - (y - x_hat.detach())).pow(2).sum(-1).mean()
    fired = kernels.count(sel.cols, sae.cfg.d_sae, vals.detach() > 0)
    return LossOutput(sum_parts(parts), parts, fired, x_hat.detach(), y, (vals, sel))


def auxk_loss(sae: SAE, dead_pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int | None) -> Tensor:
    """AuxK (Gao et al. 2024) on the dense path: the k_aux largest pre-activations among the dead latents
    (every dead latent when fewer are dead) reconstruct the residual error. dead_pre holds the pre-activations
    of the dead latents' columns `dead` alone. (The sparse path does the same through kernels.select_among.)"""
    k = k_aux or default_k_aux(sae.cfg.d_in)
    if dead_pre.shape[1] > k:
        values, indices = topk_rows(dead_pre, k)
        z = torch.zeros_like(dead_pre).scatter(-1, indices, values.relu())
    else:
        z = dead_pre.relu()
    return (z @ sae.W_dec[dead] - residual).pow(2).sum(-1).mean()


@torch.no_grad()
def update_threshold(sae: SAE, z: Tensor, decay: float = 0.99) -> None:
    """BatchTopK: track the smallest kept activation per batch (EMA) as the inference threshold."""
    kept = z[z > 0]
    if kept.numel() == 0:
        return
    batch_min = kept.min().to(sae.threshold.dtype)
    if sae.threshold <= 0:
        sae.threshold.copy_(batch_min)
    else:
        sae.threshold.mul_(decay).add_((1 - decay) * batch_min)


@torch.no_grad()
def calibrate_threshold(sae: SAE, x: Tensor) -> float:
    """BatchTopK / Matryoshka: set the inference threshold so that the mean L0 on x is exactly k: halfway
    between the (k·n)-th and (k·n+1)-th largest positive pre-activations of the sample, i.e. the batch top-k of
    one large batch. The running minimum tracked in training sits below that (it follows each batch's
    smallest kept value), so inference would keep more than k latents per token (docs/benchmarks.md)."""
    x_norm, _ = sae.normalize_input(x)
    pre = sae.pre_acts(x_norm)
    n_keep = min(sae.k * len(x), pre.numel() - 1)
    top, _ = kernels.batch_top(pre, n_keep + 1, sorted=True)
    threshold = float((top[n_keep - 1] + top[n_keep]) / 2)
    sae.threshold.fill_(threshold)
    return threshold


@torch.no_grad()
def normalize_decoder(sae: SAE) -> None:
    """Scale every decoder row to unit norm."""
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_grad(sae: SAE) -> None:
    """Project out the part of each W_dec row's gradient along the row, so unit norms survive a step.

    Rows are unit-norm between steps (normalize_decoder), so the projection needs no normalisation.
    """
    if sae.W_dec.grad is None:
        return
    dots = torch.linalg.vecdot(sae.W_dec.grad, sae.W_dec, dim=1)
    sae.W_dec.grad.addcmul_(dots[:, None], sae.W_dec, value=-1.0)
