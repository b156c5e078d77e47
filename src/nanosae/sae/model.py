"""The sparse autoencoder: one module, five architectures, SAELens parameter names.

Shapes: x (..., d_in), latents z (..., d_sae); W_enc (d_in, d_sae), W_dec (d_sae, d_in).
  relu       z = ReLU((x - b_dec) W_enc + b_enc), L1 penalty weighted by decoder row norms
  topk       keep the k largest pre-activations per token (after ReLU)
  batchtopk  training: keep the k·B largest across the batch; inference: z = pre·1[pre > threshold]
  jumprelu   z = pre·1[pre > θ_i] per latent, L0 penalty through a pseudo-derivative
  gated      z = 1[π_gate > 0] · ReLU(π_mag), π_mag uses W_enc·exp(r_mag) (shared directions)
  matryoshka BatchTopK latents; the loss sums the reconstruction error of nested prefixes of the latents
             (sizes cfg.matryoshka_groups), so early latents learn general features on their own

The same class is also a transcoder and a crosscoder, because both are an SAE with other inputs/outputs:
  transcoder  reads hook_name, predicts hook_name_out (e.g. an MLP's input -> its output): W_dec (d_sae, d_out),
              b_dec in the output space and not subtracted from the input, optional skip x W_skip^T
  crosscoder  reads and reconstructs several hooks at once (acausal): x is their concatenation, one shared
              latent space, the loss sums over layers, and decoder norms are summed per layer (L1 weights)
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from nanosae.config import BATCH_TOPK, SAEConfig
from nanosae.errors import ShapeError
from nanosae.sae import activations as act
from nanosae.sae import kernels

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LAYER_NORM_EPS = 1e-5  # OpenAI's LN(): (x - mean) / (std + eps), std with N-1


class LossOutput(NamedTuple):
    loss: Tensor
    parts: dict[str, Tensor]
    fired: Tensor  # (d_sae,) how many tokens of the batch each latent fired on
    x_hat: Tensor  # reconstruction in the normalised space (detached)
    x: Tensor  # the normalised target (the input itself, except for transcoders)


def concat_hooks(acts: dict[str, Tensor], hooks: list[str]) -> Tensor:
    """Activations of several hooks side by side (the layout of crosscoder inputs and outputs)."""
    return acts[hooks[0]] if len(hooks) == 1 else torch.cat([acts[h] for h in hooks], dim=-1)


class HookPoint(nn.Identity):
    """A named spot in the forward pass; forward hooks registered on it can read or replace the value."""


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f, d_out, dtype = cfg.d_in, cfg.d_sae, cfg.d_out, DTYPES[cfg.dtype]
        W_dec_FD = torch.randn(f, d_out, dtype=torch.float32)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        if cfg.kind == "transcoder":  # input and output are different spaces: no tied transpose
            W_enc_DF = torch.randn(d, f, dtype=torch.float32)
            W_enc_DF /= W_enc_DF.norm(dim=0, keepdim=True)
        else:
            W_enc_DF = W_dec_FD.T.contiguous()
        self.W_enc = nn.Parameter(W_enc_DF.to(dtype))
        self.W_dec = nn.Parameter(W_dec_FD.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d, dtype=dtype))
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(f, dtype=dtype))
            self.r_mag = nn.Parameter(torch.zeros(f, dtype=dtype))
            self.b_mag = nn.Parameter(torch.zeros(f, dtype=dtype))
        else:
            self.b_enc = nn.Parameter(torch.zeros(f, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((f,), 0.001, dtype=dtype))
        if cfg.architecture in BATCH_TOPK:
            # Global inference threshold, estimated during training (see update_threshold).
            self.register_buffer("threshold", torch.zeros((), dtype=dtype))
        self.use_error_term = False
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self._norm_state: tuple[Tensor, Tensor] | None = None
        self.to(cfg.device)

    # ---- properties -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ---- input normalisation ----------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeError(f"SAE input has last dimension {x.shape[-1]}, expected d_in={self.cfg.d_in} (shape {tuple(x.shape)})")
        return x.to(self.dtype)

    def _factor(self, scale: float | list[float], width: int) -> float | Tensor:
        if isinstance(scale, (list, tuple)):  # one factor per block (crosscoder layer)
            return torch.tensor(scale, dtype=self.dtype, device=self.device).repeat_interleave(width // len(scale))
        return float(scale)

    def input_factor(self) -> float | Tensor:
        """What inputs are multiplied by before encoding (a float, or per-column for crosscoders)."""
        return self._factor(self.cfg.activation_scale, self.cfg.d_in)

    def output_factor(self) -> float | Tensor:
        """What reconstructions are divided by to return to the model's units."""
        scale = self.cfg.output_scale if self.cfg.output_scale is not None else self.cfg.activation_scale
        return self._factor(scale, self.cfg.d_out)

    def _normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        state = None
        if self.cfg.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            x = x / (std + LAYER_NORM_EPS)
            state = (mu, std)
        factor = self.input_factor()
        if not isinstance(factor, float) or factor != 1.0:
            x = x * factor
        return x, state

    def normalize_target(self, y: Tensor) -> Tensor:
        """A transcoder's target in the space the decoder writes (scaled by the output factor)."""
        if y.shape[-1] != self.cfg.d_out:
            raise ShapeError(f"SAE target has last dimension {y.shape[-1]}, expected d_out={self.cfg.d_out} (shape {tuple(y.shape)})")
        factor = self.output_factor()
        return y.to(self.dtype) * factor if not isinstance(factor, float) or factor != 1.0 else y.to(self.dtype)

    def _denormalize(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> Tensor:
        factor = self.output_factor()
        if not isinstance(factor, float) or factor != 1.0:
            x = x / factor
        if state is not None:
            mu, std = state
            x = x * std + mu
        return x

    # ---- encode / decode --------------------------------------------------------------------
    def _centred(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x_norm: Tensor) -> Tensor:
        """Pre-activations of a normalised input (for gated: the magnitude path π_mag)."""
        xc = self._centred(x_norm)
        if self.cfg.architecture == "gated":
            return xc @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return xc @ self.W_enc + self.b_enc

    def gate_pre_acts(self, x_norm: Tensor) -> Tensor:
        """Gated SAEs only: π_gate, whose sign decides which latents are active."""
        return self._centred(x_norm) @ self.W_enc + self.b_gate

    def activate(self, pre: Tensor, x_norm: Tensor | None = None) -> Tensor:
        """Latents from pre-activations (x_norm is needed by gated SAEs for the gate path)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            values, indices = act.topk(pre, self.cfg.k)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        if arch in BATCH_TOPK:
            if self.training:
                return self._batch_topk(pre)
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if arch == "jumprelu":
            return act.jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        # gated: the gate's Heaviside step passes no gradient; the gate trains through the aux loss
        gate = (self.gate_pre_acts(x_norm) > 0).to(pre.dtype)
        return gate * pre.relu()

    def _batch_topk(self, pre: Tensor) -> Tensor:
        flat = pre.relu().reshape(-1)
        n_keep = min(self.cfg.k * (pre.numel() // self.cfg.d_sae), flat.numel())
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).reshape(pre.shape)

    def encode(self, x: Tensor) -> Tensor:
        """Latents z (..., d_sae). Remembers layer-norm statistics so decode() can undo them."""
        x = self.hook_sae_input(self._check(x))
        x_norm, self._norm_state = self._normalize(x)
        pre = self.hook_sae_acts_pre(self.pre_acts(x_norm))
        return self.hook_sae_acts_post(self.activate(pre, x_norm))

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction in the input's units (undoes scaling and the last encode's layer norm).

        A skip transcoder's W_skip term depends on the input, so forward() adds it, as in SAELens."""
        x_hat = z.to(self.dtype) @ self.W_dec + self.b_dec
        return self.hook_sae_recons(self._denormalize(x_hat, self._norm_state))

    def _skip(self, x_norm: Tensor) -> Tensor | float:
        return x_norm @ self.W_skip.T if self.cfg.skip_connection else 0.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        x_hat = self.decode(z)
        if self.cfg.skip_connection:
            x_hat = x_hat + self._denormalize(self._skip(self._normalize(self._check(x))[0]), None)
        return x_hat, z

    def reconstruct_clean(self, x: Tensor) -> Tensor:
        """x_hat without running any hook: what the error term of a splice is measured against."""
        x_norm, state = self._normalize(self._check(x))
        z = self.activate(self.pre_acts(x_norm), x_norm)
        return self._denormalize(z @ self.W_dec + self.b_dec + self._skip(x_norm), state)

    def gather_input(self, acts: dict[str, Tensor], hooks: list[str] | None = None) -> Tensor:
        """The SAE's input from activations by hook name (crosscoders: their layers side by side).

        hooks: where to read instead of cfg.input_hooks (e.g. a plain SAE evaluated at another hook)."""
        return concat_hooks(acts, hooks or self.cfg.input_hooks)

    def output_blocks(self, x_hat: Tensor, hooks: list[str] | None = None) -> dict[str, Tensor]:
        """A reconstruction split into the output hooks' values (one per crosscoder layer)."""
        hooks = hooks or self.cfg.output_hooks
        return dict(zip(hooks, x_hat.chunk(len(hooks), dim=-1)))

    def decoder_norms(self) -> Tensor:
        """Per-latent decoder norm; a crosscoder sums its per-layer norms (its L1 weights)."""
        if self.cfg.crosscoder_hooks:
            return self.W_dec.view(self.cfg.d_sae, self.cfg.n_blocks, -1).norm(dim=-1).sum(-1)
        return self.W_dec.norm(dim=1)

    def splice(self, x: Tensor) -> Tensor:
        """What the host model sees when this SAE is spliced in at its hook.

        With use_error_term the output is x_hat + (x - x_hat_clean): exactly x until a hook edits the
        latents, and then x plus the edit's effect (TransformerLens HookedSAE semantics).
        """
        if self.cfg.kind != "sae":
            raise ShapeError(f"splice() is for SAEs at one hook; a {self.cfg.kind} reads {self.cfg.input_hooks} and writes "
                             f"{self.cfg.output_hooks}")
        x_hat, _ = self(x)
        if self.use_error_term:
            with torch.no_grad():
                error = self._check(x) - self.reconstruct_clean(x)
            x_hat = x_hat + self.hook_sae_error(error)
        return self.hook_sae_output(x_hat).to(x.dtype)

    # ---- training helpers ---------------------------------------------------------------------
    def loss(
        self,
        x: Tensor,
        target: Tensor | None = None,
        *,
        sparsity_coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        k_aux: int | None = None,
        aux_coefficient: float = 1 / 32,
        fast: bool = True,
    ) -> LossOutput:
        """Training loss and its parts for a batch x (B, d_in); squared errors are summed over the output.

        target (B, d_out) is what a transcoder predicts; SAEs and crosscoders reconstruct x itself.

        sparsity_coefficient is the L1 weight (relu, gated) or the L0 weight (jumprelu).
        dead_mask (d_sae,) enables the AuxK loss (topk/batchtopk): the k_aux largest dead latents
        reconstruct the residual error (Gao et al. 2024). fast uses the sparse kernels for
        topk/batchtopk (same values and gradients as the dense path, far fewer FLOPs).
        """
        x_norm, _ = self._normalize(self._check(x))
        y = x_norm if target is None else self.normalize_target(target)
        arch = self.cfg.architecture
        if fast and arch in ("topk", "batchtopk") and not x_norm.requires_grad:  # the input's gradient needs the dense path
            return self._sparse_loss(x_norm, y, dead_mask, k_aux, aux_coefficient)
        pre = self.pre_acts(x_norm)
        z = self.activate(pre, x_norm)
        skip = self._skip(x_norm)
        x_hat = z @ self.W_dec + self.b_dec + skip
        parts = {"mse": (x_hat - y).pow(2).sum(-1).mean()}
        if arch == "matryoshka":  # every nested prefix reconstructs y on its own; the full one is "mse"
            for m in self.cfg.matryoshka_groups[:-1]:
                prefix_hat = z[:, :m] @ self.W_dec[:m] + self.b_dec + skip
                parts[f"mse_{m}"] = (prefix_hat - y).pow(2).sum(-1).mean()
        dec_norms = self.decoder_norms()
        if arch == "relu":
            parts["l1"] = sparsity_coefficient * (z * dec_norms).sum(-1).mean()
        elif arch == "jumprelu":
            active = act.step(pre, self.threshold, self.cfg.jumprelu_bandwidth)
            parts["l0"] = sparsity_coefficient * active.sum(-1).mean()
        elif arch == "gated":
            gate_relu = self.gate_pre_acts(x_norm).relu()
            parts["l1"] = sparsity_coefficient * (gate_relu * dec_norms).sum(-1).mean()
            via_gate = gate_relu @ self.W_dec.detach() + self.b_dec.detach()
            if self.cfg.skip_connection:
                via_gate = via_gate + skip.detach()
            parts["aux"] = (via_gate - y).pow(2).sum(-1).mean()
        elif dead_mask is not None and bool(dead_mask.any()):  # topk, batchtopk, matryoshka
            dead = dead_mask.nonzero().squeeze(1)
            parts["auxk"] = aux_coefficient * self._auxk_loss(pre[:, dead], dead, y - x_hat.detach(), k_aux)
        if arch in BATCH_TOPK and self.training:
            self.update_threshold(z)
        return LossOutput(sum(parts.values()), parts, (z > 0).sum(0), x_hat.detach(), y)

    def _sparse_loss(self, x_norm: Tensor, y: Tensor, dead_mask: Tensor | None, k_aux: int | None,
                     aux_coefficient: float) -> LossOutput:
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        dead = dead_mask if dead_mask is not None and bool(dead_mask.any()) else None
        k_aux = k_aux or self.cfg.d_in // 2
        xc = self._centred(x_norm).detach()
        if self.cfg.architecture == "topk":
            sel = kernels.encode_select_topk(xc, self.W_enc.detach(), self.b_enc.detach(), self.cfg.k)
        else:
            with torch.no_grad():
                pre = xc @ self.W_enc
                pre += self.b_enc
            sel = kernels.select_batch_topk(pre, self.cfg.k)
        vals = kernels.selected_preacts(xc, self.W_enc, self.b_enc, b_dec, sel).relu()
        x_hat = kernels.sparse_decode(vals, sel, self.W_dec) + self.b_dec + self._skip(x_norm)
        parts = {"mse": (x_hat - y).pow(2).sum(-1).mean()}
        if dead is not None:
            dead_idx = dead.nonzero().squeeze(1)
            dead_pre = self._centred(x_norm) @ self.W_enc[:, dead_idx] + self.b_enc[dead_idx]  # dead columns only
            parts["auxk"] = aux_coefficient * self._auxk_loss(dead_pre, dead_idx, y - x_hat.detach(), k_aux)
        fired = torch.bincount(sel.cols[vals.detach() > 0], minlength=self.cfg.d_sae)
        if self.cfg.architecture == "batchtopk" and self.training:
            self.update_threshold(vals.detach())
        return LossOutput(sum(parts.values()), parts, fired, x_hat.detach(), y)

    def _auxk_loss(self, dead_pre: Tensor, dead: Tensor, residual: Tensor, k_aux: int | None) -> Tensor:
        """AuxK (Gao et al. 2024): the k_aux largest pre-activations among the dead latents (every dead latent
        when fewer are dead, the usual case) reconstruct the residual error. dead_pre holds the pre-activations
        of the dead latents' columns `dead` alone: dead latents are a few % of d_sae, so this is a small dense
        problem (on the sparse path, cheaper than selecting and scattering that many sparse entries per token:
        with the embedding_bag gradients, a 1024-token CPU step ~20% faster)."""
        k = k_aux or self.cfg.d_in // 2
        if dead_pre.shape[1] > k:
            values, indices = act.topk(dead_pre, k)
            z = torch.zeros_like(dead_pre).scatter(-1, indices, values)
        else:
            z = dead_pre.relu()
        return (z @ self.W_dec[dead] - residual).pow(2).sum(-1).mean()

    @torch.no_grad()
    def update_threshold(self, z: Tensor, decay: float = 0.99) -> None:
        """BatchTopK: track the smallest kept activation per batch (EMA) as the inference threshold."""
        kept = z[z > 0]
        if kept.numel() == 0:
            return
        batch_min = kept.min().to(self.threshold.dtype)
        if self.threshold <= 0:
            self.threshold.copy_(batch_min)
        else:
            self.threshold.mul_(decay).add_((1 - decay) * batch_min)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the part of each W_dec row's gradient along the row, so unit norms survive a step.

        Rows are unit-norm between steps (normalize_decoder), so the projection needs no normalisation.
        """
        if self.W_dec.grad is None:
            return
        dots = torch.linalg.vecdot(self.W_dec.grad, self.W_dec, dim=1)
        self.W_dec.grad.addcmul_(dots[:, None], self.W_dec, value=-1.0)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from nanosae.sae.formats import save_sae

        return save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", normalize: bool | None = None) -> "SAE":
        """Load our dir, a SAELens dir, or an OpenAI sparse_autoencoder .pt (normalize: override its LN flag)."""
        from nanosae.sae.formats import load_sae

        return load_sae(path, device=device, normalize=normalize)
