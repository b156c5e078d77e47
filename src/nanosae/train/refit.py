"""Decoder refit: when training ends, the decoder becomes the least-squares decoder for the encoder's codes.

With unit-norm rows and a few hundred Adam steps, an SAE's decoder is still far from the best one for the codes
its trained encoder gives: the codes run small (the least-squares rows are ~1.3× longer on average) and the
directions lag. Solving for the decoder once, over the stored activations read one more time, takes seconds and
lowered held-out FVU and the CE-loss gap on every job measured (docs/benchmarks.md). The refit rows are not
unit-norm: their lengths carry the scale the codes lack, so the encoder, and which latents it picks, stay as
they were.

  G = Σ [z, 1]ᵀ[z, 1]   R = Σ [z, 1]ᵀ y   over the stored tokens (z: the final codes, y: the normalised target)
  [W_dec; b_dec] = (G + W)⁻¹ (R + W·[W_dec; b_dec]_trained)
  W: PRIOR × mean(diag G) for every latent (a rare latent stays near its trained row), a small ridge for b_dec

G is (d_sae+1)², which is why the default applies up to MAX_DEFAULT_LATENTS latents. It needs the stored
activations: the codes of a streamed run's last steps come from an encoder still moving, which is why streamed
runs are not refit (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nanosae import registry
from nanosae.config import TrainConfig
from nanosae.errors import ConfigError
from nanosae.sae import SAE, kernels

MAX_DEFAULT_LATENTS = 8192  # G in float64 is 512 MiB at this width
MAX_TOKENS = 2_000_000  # read at most this many stored tokens again
READ_BATCH = 4096  # tokens per read of that pass (its own size: the training batch may be far smaller)
RIDGE = 1e-4  # the bias row's, relative to its diagonal entry
PRIOR = 0.1  # every latent's pull to its trained row, relative to the mean of G's diagonal


class DecoderRefit:
    """The normal equations of the decoder, summed over batches of codes."""

    def __init__(self, d_sae: int, d_out: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(d_sae + 1, d_sae + 1, dtype=torch.float64, device=device)  # one side: full_gram()
        self.cross = torch.zeros(d_sae + 1, d_out, dtype=torch.float64, device=device)

    def add(self, vals: Tensor, sel: kernels.Selection, y: Tensor) -> None:
        """One batch: its selected latent values (sel's layout, token-major) and normalised targets y (B, d_out)."""
        m = self.gram.shape[0] - 1
        vals, y = vals.detach().double(), y.detach().double()
        a, b = _pairs(sel)  # every pair of one token's latents, once: z_a·z_b added at (a, b)
        for t in range(0, len(a), 1 << 22):  # bounded index tensors, however many latents a token holds
            i, j = a[t : t + (1 << 22)], b[t : t + (1 << 22)]
            kernels.index_add_exact(self.gram.view(-1), sel.cols[i] * (m + 1) + sel.cols[j], vals[i] * vals[j])
        self.gram[m, :m] += sel.by_latent_sum(vals)
        self.gram[m, m] += len(y)
        self.cross[:m] += sel.by_latent_times(vals, y)
        self.cross[m] += y.sum(0)

    def full_gram(self) -> Tensor:
        """G itself: add() writes each pair of latents once, on one side of the diagonal (half the work)."""
        return self.gram + self.gram.T - torch.diag(self.gram.diagonal())

    @torch.no_grad()
    def apply(self, sae: SAE) -> int:
        """Set the SAE's decoder to the least-squares solution; returns how many latents were refit.

        The solution is pulled towards the trained rows with the same weight for every latent (PRIOR × the mean
        of G's diagonal): a latent that fired often is set by its data, a rare one stays near its trained row
        instead of fitting the few tokens it fired on."""
        m = self.gram.shape[0] - 1
        gram = self.full_gram()
        diag = gram.diagonal()
        fired = diag[:m] > 0
        keep = torch.cat([fired, fired.new_ones(1)])  # the bias row always
        weight = torch.full(
            (int(keep.sum()),), PRIOR * float(diag[:m][fired].mean()), dtype=torch.float64, device=diag.device
        )
        weight[-1] = RIDGE * float(diag[m])
        trained = torch.cat([sae.W_dec[fired.to(sae.device)], sae.b_dec[None]]).to(diag.device, torch.float64)
        solution = torch.linalg.solve(
            gram[keep][:, keep] + torch.diag(weight), self.cross[keep] + weight[:, None] * trained
        ).to(sae.W_dec.dtype)
        rows, bias = solution[:-1].to(sae.device), solution[-1].to(sae.device)
        if sae.cfg.apply_b_dec_to_input:  # the encoder subtracts b_dec: move b_enc so its pre-activations stay
            sae.b_enc.add_((bias - sae.b_dec) @ sae.W_enc)
        sae.W_dec[fired.to(sae.device)] = rows
        sae.b_dec.copy_(bias)
        return int(fired.sum())


def _pairs(sel: kernels.Selection) -> tuple[Tensor, Tensor]:
    """Entry indices (a, b), a <= b, of every pair of entries of the same token: sel is token-major, so entry a
    at slot s of a token holding c entries pairs with a, a+1, ..., a+(c-s-1). No padding, so a token with many
    latents (BatchTopK) costs its own pairs only."""
    n = len(sel.rows)
    counts = torch.diff(sel.offsets, append=sel.offsets.new_tensor([n]))
    slot = torch.arange(n, device=sel.rows.device) - sel.offsets[sel.rows]
    partners = counts[sel.rows] - slot
    a = torch.repeat_interleave(torch.arange(n, device=sel.rows.device), partners)
    block = torch.repeat_interleave(torch.cumsum(partners, 0) - partners, partners)
    return a, a + (torch.arange(len(a), device=a.device) - block)


def codes(sae: SAE, x: Tensor) -> tuple[Tensor, kernels.Selection]:
    """The codes the trained SAE gives x (inference: BatchTopK by its threshold), as sparse values and places.
    TopK through the training step's sparse kernel (no (B, d_sae) tensor), the rest through encode()."""
    if sae.arch.selection == "token" and sae.arch.sparse and sae.cfg.normalize_activations == "none":
        x_norm = sae.normalize_input(x)[0]
        sel, _ = kernels.encode_select_topk(sae.centre(x_norm), sae.W_enc, sae.b_enc, sae.k)
        return sel.pre.relu(), sel
    z = sae.encode(x)
    rows, cols = z.nonzero(as_tuple=True)
    return z[rows, cols], kernels.by_row(rows, cols, z[rows, cols], len(x), sae.cfg.d_sae)


def refit_applies(cfg: TrainConfig, stored: bool) -> bool:
    """Whether the run refits its decoder: refit_decoder, or its default where the refit applies."""
    o, sae = cfg.optim, cfg.sae
    why_not = (
        f"it is for {' and '.join(registry.sparse_names())} SAEs"
        if sae.arch.sparse is None
        else "it reads the stored activations again (--acts), and this run streams them"
        if not stored
        else "the end-to-end fine-tune (kl_finetune) trains the decoder last"
        if o.kl_finetune
        else "the latents are sharded over processes (shard_latents)"
        if cfg.shard_latents
        else "a cross-layer transcoder's decoders are coupled across layers"
        if sae.cross_layer
        else "a skip transcoder's target includes its skip term"
        if sae.skip_connection
        else None
    )
    if o.refit_decoder is None:
        return why_not is None and sae.d_sae <= MAX_DEFAULT_LATENTS
    if o.refit_decoder and why_not:
        raise ConfigError(f"refit_decoder cannot be used here: {why_not}")
    return o.refit_decoder
