"""Sparse TopK / BatchTopK training math: only the selected latents cost anything after the encoder GEMM.

A TopK SAE step with dense autograd does four (B × d_in × d_sae) GEMMs: the encoder, the decoder, and
the two weight gradients. Only k of d_sae latents per token are non-zero, so here:
  decode        x_hat = embedding_bag(cols, W_dec, per_sample_weights=vals)       (gather-and-sum of k rows)
  dvals         sampled dot products g_BD[rows] · W_dec[cols]                     (sparse.sampled_addmm)
  dW_dec, dW_enc  embedding_bag over the latent-major order of g_BD / x            (sum of k rows per token)
  db_enc        index_add of the selected gradients
leaving the encoder's forward GEMM (needed to find the top k) as the only dense work. AuxK is one more
Selection (the k_aux largest dead latents per token, picked from the same pre-activations) through the same
two functions, so a step with half the latents dead adds sparse work, not dense GEMMs.
Selections are flat (rows, cols) lists sorted by row; `offsets` marks where each row's bag starts.
On a GPU the step has no host synchronisation (counts are integer index_adds, not bincount, which reads the
maximum back) and every float sum is taken in a fixed order, so a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from nanosae.sae.topk import topk_rows

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class Selection:
    rows: Tensor  # (n,) token index of each selected latent, sorted
    cols: Tensor  # (n,) latent index
    offsets: Tensor  # (B,) start of each token's entries in rows/cols
    pre: Tensor  # (n,) the selected pre-activations (no grad)
    n_latents: int
    same_per_row: bool = False  # exactly k latents per token (TopK): the selections cuSPARSE's SpMM is used on

    @cached_property
    def _transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, crow, rows[order]) of the latent-major layout: one counting sort, shared by both backwards."""
        order = torch.argsort(self.cols.int(), stable=True)  # int32 sorts far faster than int64 on CPU
        counts = count(self.cols, self.n_latents)
        return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)]), self.rows[order]

    def by_token(self, values: Tensor) -> Tensor:
        """(B, d_sae) CSR matrix with `values` at the selected places."""
        return csr(self.offsets, self.cols, values, self.n_latents)

    def by_latent_times(self, values: Tensor, dense_BD: Tensor) -> Tensor:
        """(d_sae, D): Σ over a latent's selections of value · dense[row], i.e. (the (B, d_sae) matrix of
        `values`)ᵀ @ dense, as a sum of rows over the latent-major order."""
        order, crow, rows = self._transpose
        return rows_sum(rows, crow[:-1], values[order], dense_BD, self.same_per_row)

    def by_latent_sum(self, values: Tensor) -> Tensor:
        """(d_sae,): Σ over a latent's selections of value, in the same order on every run and device."""
        order, crow, _ = self._transpose
        return torch.segment_reduce(values[order], "sum", offsets=crow, unsafe=True)  # unsafe: no check that syncs


# How a weighted sum of selected rows is taken, per device type: "embedding_bag" (a gather-and-sum with no
# zero-filled result) or "csr" (a sparse CSR matrix times the dense rows: cuSPARSE's SpMM on a GPU). A module
# setting so that benchmarks/gpu.py can time both on the same step; docs/scale.md gives the figures behind it.
# "csr" is faster on a GPU's large steps but not the default: with it on, the CUDA tests hit an illegal memory
# access whose cause is not yet found (docs/scale.md), so csr is for measuring, and only on TopK's selections.
ROWS_SUM = {"cpu": "embedding_bag", "cuda": "embedding_bag"}


def csr(offsets: Tensor, cols: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """(len(offsets), n_cols) CSR matrix whose row r holds values[offsets[r]:offsets[r+1]] at cols."""
    crow = torch.cat([offsets, offsets.new_full((1,), len(cols))])  # no host-to-device copy (a sync)
    return torch.sparse_csr_tensor(crow, cols, values, (len(offsets), n_cols), check_invariants=False)


def rows_sum(index: Tensor, offsets: Tensor, weights: Tensor, table: Tensor, csr_ok: bool = True) -> Tensor:
    """(len(offsets), D): out[b] = Σ_j weights[j] · table[index[j]] over bag b's entries (offsets[b] onwards)."""
    if csr_ok and ROWS_SUM.get(table.device.type, "embedding_bag") == "csr":
        return csr(offsets, index, weights, len(table)) @ table
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


def count(index: Tensor, n: int, where: Tensor | None = None) -> Tensor:
    """(n,) how often each of 0..n-1 occurs in index (only where `where` holds, when given): bincount without
    the host sync CUDA's bincount makes, and without the one a boolean mask would."""
    ones = torch.ones_like(index) if where is None else where.long()
    return torch.zeros(n, dtype=torch.long, device=index.device).index_add_(0, index, ones)


def index_add_exact(target: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """target.index_add_(0, index, values), summed in one fixed order on every device: CUDA's index_add_ adds
    floats in whatever order its atomics land, which changes the last bits from run to run."""
    if target.device.type == "cpu":
        return target.index_add_(0, index, values)
    return target.add_(sorted_sum(index, values, len(target)))


def sorted_sum(index: Tensor, values: Tensor, n: int) -> Tensor:
    """(n,) Σ of values per index, each sum taken in the order the values come (a stable sort, then segments)."""
    order = torch.argsort(index, stable=True)
    return torch.segment_reduce(values[order], "sum", lengths=count(index, n), unsafe=True)


def by_row(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int, n_latents: int) -> Selection:
    """A Selection from (row, latent, value) entries sorted by row, any number per row (none included)."""
    counts = count(rows, n_rows)
    return Selection(rows, cols, torch.cumsum(counts, 0) - counts, vals, n_latents)


def per_token(vals_Bk: Tensor, idx_Bk: Tensor, n_latents: int) -> Selection:
    """A Selection of exactly k latents per token, from topk's (values, indices)."""
    B, k = idx_Bk.shape
    rows = torch.arange(B, device=idx_Bk.device).repeat_interleave(k)
    offsets = torch.arange(0, B * k, k, device=idx_Bk.device)
    return Selection(rows, idx_Bk.reshape(-1), offsets, vals_Bk.reshape(-1), n_latents, same_per_row=True)


def encode_select_topk(
    xc_BD: Tensor,
    W_enc_DF: Tensor,
    b_enc_F: Tensor,
    k: int,
    chunk: int | None = None,
    dead: Tensor | None = None,
    k_aux: int = 0,
    gemm_dtype: torch.dtype | None = None,
) -> tuple[Selection, Selection | None]:
    """Encoder GEMM and top-k in row chunks (the chunk stays in cache for topk; no (B, d_sae) buffer).

    With dead latent indices, also AuxK's selection from the same pre-activations: the k_aux largest among
    the dead latents of each token (all of them when fewer are dead), so AuxK costs no second encoder GEMM.
    gemm_dtype (e.g. bfloat16 on a GPU's tensor cores): the GEMM's precision, as autocast would run it; the
    selected values come back in the weights' dtype."""
    B, Fdim, dtype = xc_BD.shape[0], W_enc_DF.shape[1], W_enc_DF.dtype
    if chunk is None and W_enc_DF.device.type == "cpu":
        chunk = min(1024, max(64, 2**26 // Fdim))  # the buffer stays <= 256 MB of float32 and in cache for topk
    chunk = chunk or max(64, 2**29 // Fdim)  # a GPU takes the batch in one GEMM, up to a 2 GiB float32 buffer
    gemm_dtype = gemm_dtype or dtype
    W, b = W_enc_DF.to(gemm_dtype), b_enc_F.to(gemm_dtype)
    values, indices, aux_values, aux_indices = [], [], [], []
    # one buffer for every chunk: allocating a fresh (chunk, d_sae) tensor per chunk costs page faults each time
    buf = torch.empty(min(chunk, B), Fdim, dtype=gemm_dtype, device=W_enc_DF.device)
    with torch.no_grad():
        for i in range(0, B, chunk):
            x_chunk = xc_BD[i : i + chunk].to(gemm_dtype)
            pre = torch.addmm(b, x_chunk, W, out=buf[: len(x_chunk)])
            v, idx = topk_rows(pre, k)
            values.append(v.to(dtype))
            indices.append(idx)
            if dead is not None:
                v, idx = select_among(pre, dead, k_aux)
                aux_values.append(v.to(dtype))
                aux_indices.append(idx)
    sel = per_token(torch.cat(values), torch.cat(indices), Fdim)
    return sel, per_token(torch.cat(aux_values), torch.cat(aux_indices), Fdim) if dead is not None else None


def select_among(pre_BF: Tensor, columns: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, latent indices) of the k largest pre-activations per row among `columns` (all of them when
    there are no more than k)."""
    sub = pre_BF.index_select(1, columns)
    if len(columns) <= k:
        return sub, columns.expand(len(sub), -1)
    v, idx = topk_rows(sub, k)
    return v, columns[idx]


def batch_top(pre: Tensor, n: int, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """(values, flat indices) of the n largest ReLU'd pre-activations of a whole batch: BatchTopK's one
    selection (training keeps n = k·B of them; its inference threshold sits between the k·B-th and the next)."""
    return pre.relu().reshape(-1).topk(min(n, pre.numel()), sorted=sorted)


def select_batch_topk(pre_BF: Tensor, k: int) -> Selection:
    """The k·B largest (positive) pre-activations of the whole batch."""
    B, Fdim = pre_BF.shape
    vals, flat = batch_top(pre_BF, k * B)
    flat, order = flat.sort()
    vals = vals[order]
    return by_row(flat // Fdim, flat % Fdim, vals, B, Fdim)


class _SelectedPreacts(torch.autograd.Function):
    """The selected pre-activations of xc = x - b_dec; backward scatters their gradient into W_enc, b_enc, b_dec.

    xc is a constant here (the input needs no gradient in training). b_dec's gradient needs no per-token
    work: Σ_tokens d(pre)/d(b_dec) = -W_enc @ (gradient of b_enc).
    """

    @staticmethod
    def forward(
        ctx, xc_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, sel: Selection
    ) -> Tensor:
        ctx.save_for_backward(xc_BD, W_enc_DF)
        ctx.sel, ctx.centred = sel, b_dec_D is not None
        return sel.pre.clone()

    @staticmethod
    def backward(ctx, g_n: Tensor):
        xc_BD, W_enc_DF = ctx.saved_tensors
        sel = ctx.sel
        grad_W = grad_b = grad_b_dec = None
        grad_b_enc = sel.by_latent_sum(g_n)
        if ctx.needs_input_grad[1]:
            grad_W = sel.by_latent_times(g_n, xc_BD).T  # (d_sae, d_in), viewed as (d_in, d_sae)
        if ctx.needs_input_grad[2]:
            grad_b = grad_b_enc
        if ctx.centred and ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc_DF @ grad_b_enc)
        return None, grad_W, grad_b, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """x_hat = Σ_j vals_j W_dec[cols_j]; backward: sampled dot products for vals, sparse @ dense for W_dec."""

    @staticmethod
    def forward(ctx, vals: Tensor, W_dec_FD: Tensor, sel: Selection) -> Tensor:
        ctx.save_for_backward(vals, W_dec_FD)
        ctx.sel = sel
        return rows_sum(sel.cols, sel.offsets, vals, W_dec_FD, sel.same_per_row)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        vals, W_dec_FD = ctx.saved_tensors
        sel = ctx.sel
        grad_vals = grad_W = None
        g_BD = g_BD.contiguous()
        if ctx.needs_input_grad[0]:
            pattern = sel.by_token(torch.zeros_like(vals))
            grad_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W = sel.by_latent_times(vals, g_BD)
        return grad_vals, grad_W, None


def selected_preacts(
    xc_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor | None, sel: Selection
) -> Tensor:
    """The selected pre-activations as a differentiable (n,) tensor. xc_BD is the (detached) centred input
    x - b_dec; pass b_dec so it gets its gradient (None when the input is not centred)."""
    return _SelectedPreacts.apply(xc_BD.detach(), W_enc_DF, b_enc_F, b_dec_D, sel)


def sparse_decode(vals: Tensor, sel: Selection, W_dec_FD: Tensor) -> Tensor:
    """Σ_j vals_j · W_dec[cols_j] per token (without b_dec): (B, d_in)."""
    return _SparseDecode.apply(vals, W_dec_FD, sel)
