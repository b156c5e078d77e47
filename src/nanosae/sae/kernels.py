"""Sparse TopK / BatchTopK training math: only the selected latents cost anything after the encoder GEMM.

A TopK SAE step with dense autograd does four (B × d_in × d_sae) GEMMs: the encoder, the decoder, and
the two weight gradients. Only k of d_sae latents per token are non-zero, so here:
  decode        x_hat = embedding_bag(cols, W_dec, per_sample_weights=vals)       (gather-and-sum of k rows)
  dW_dec, dvals from embedding_bag's own backward                                 (scatter of k rows)
  dW_enc        W_enc.T.index_add_(cols, g · x[rows])                             (scatter of k columns)
  db_enc, dx    index_add / embedding_bag over W_enc.T                            (k per token)
leaving the encoder's forward GEMM (needed to find the top k) as the only dense work.
Selections are flat (rows, cols) lists sorted by row; `offsets` marks where each row's bag starts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 1 << 16  # selected entries per index_add chunk: bounds the (chunk, d_in) temporary


class Selection(NamedTuple):
    rows: Tensor  # (n,) token index of each selected latent, sorted
    cols: Tensor  # (n,) latent index
    offsets: Tensor  # (B,) start of each token's entries in rows/cols
    pre: Tensor  # (n,) the selected pre-activations (no grad)


def select_topk(pre_BF: Tensor, k: int) -> Selection:
    B = pre_BF.shape[0]
    vals, idx = pre_BF.topk(k, dim=-1, sorted=False)
    rows = torch.arange(B, device=pre_BF.device).repeat_interleave(k)
    offsets = torch.arange(0, B * k, k, device=pre_BF.device)
    return Selection(rows, idx.reshape(-1), offsets, vals.reshape(-1))


def select_batch_topk(pre_BF: Tensor, k: int) -> Selection:
    """The k·B largest (positive) pre-activations of the whole batch."""
    B, Fdim = pre_BF.shape
    vals, flat = pre_BF.reshape(-1).topk(min(k * B, pre_BF.numel()), sorted=False)
    flat, order = flat.sort()
    vals = vals[order]
    rows, cols = flat // Fdim, flat % Fdim
    counts = torch.bincount(rows, minlength=B)
    offsets = torch.cumsum(counts, 0) - counts
    return Selection(rows, cols, offsets, vals)


def select_dead_topk(pre_BF: Tensor, dead_F: Tensor, k: int) -> Selection:
    """For AuxK: the k largest pre-activations among dead latents only."""
    k = min(k, int(dead_F.sum()))
    return select_topk(pre_BF.masked_fill(~dead_F, float("-inf")), k)


class _SelectedPreacts(torch.autograd.Function):
    """Returns the selected pre-activations; backward scatters their gradient into W_enc, b_enc, x only."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, sel_pre: Tensor, rows: Tensor, cols: Tensor,
                offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x_BD, W_enc_DF, rows, cols, offsets)
        return sel_pre.clone()

    @staticmethod
    def backward(ctx, g_n: Tensor):
        x_BD, W_enc_DF, rows, cols, offsets = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, W_enc_DF.T.contiguous(), offsets, mode="sum", per_sample_weights=g_n)
        if ctx.needs_input_grad[1]:
            grad_WT = torch.zeros(W_enc_DF.shape[1], W_enc_DF.shape[0], dtype=g_n.dtype, device=g_n.device)
            for i in range(0, len(cols), CHUNK):
                sl = slice(i, i + CHUNK)
                grad_WT.index_add_(0, cols[sl], x_BD[rows[sl]] * g_n[sl, None])
            grad_W = grad_WT.T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc_DF.shape[1], dtype=g_n.dtype, device=g_n.device).index_add_(0, cols, g_n)
        return grad_x, grad_W, grad_b, None, None, None, None


def selected_preacts(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, sel: Selection) -> Tensor:
    """The selected pre-activations as a differentiable (n,) tensor."""
    return _SelectedPreacts.apply(x_BD, W_enc_DF, b_enc_F, sel.pre, sel.rows, sel.cols, sel.offsets)


def sparse_decode(vals: Tensor, sel: Selection, W_dec_FD: Tensor) -> Tensor:
    """Σ_j vals_j · W_dec[cols_j] per token (without b_dec): (B, d_in)."""
    return F.embedding_bag(sel.cols, W_dec_FD, sel.offsets, mode="sum", per_sample_weights=vals)
