"""The built-in architectures, registered in nanosae.registry's table (adding an architecture starts here).

relu       z = ReLU(pre), L1 penalty weighted by decoder row norms; dead latents are resampled
topk       keep the k largest pre-activations per token (after ReLU); AuxK for dead latents
batchtopk  training: keep the k·B largest across the batch; inference: z = pre·1[pre > threshold]
matryoshka BatchTopK latents; the loss sums the reconstruction error of nested prefixes of the latents
           (sizes cfg.matryoshka_groups), so early latents learn general features on their own
jumprelu   z = pre·1[pre > θ_i] per latent, L0 penalty through a pseudo-derivative
gated      z = 1[π_gate > 0] · ReLU(π_mag), π_mag uses W_enc·exp(r_mag) (shared directions)
"""

from __future__ import annotations

import torch
from torch import Tensor

from nanosae.registry import Architecture, LossInputs, register
from nanosae.sae import kernels
from nanosae.sae.jumprelu import jumprelu, step
from nanosae.sae.topk import topk_rows


# ---- activations ------------------------------------------------------------------------------------
def _relu(sae, pre: Tensor, x_norm: Tensor | None, k: int | None = None) -> Tensor:
    return pre.relu()


def _topk(sae, pre: Tensor, x_norm: Tensor | None, k: int) -> Tensor:
    """The k largest pre-activations per token, after ReLU."""
    values, indices = topk_rows(pre, k)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _batch_topk(sae, pre: Tensor, x_norm: Tensor | None, k: int) -> Tensor:
    """The k·B largest of the batch."""
    values, indices = kernels.batch_top(pre, k * (pre.numel() // sae.cfg.d_sae))
    return torch.zeros(pre.numel(), dtype=pre.dtype, device=pre.device).scatter(0, indices, values).reshape(pre.shape)


def _above_threshold(sae, pre: Tensor, x_norm: Tensor | None) -> Tensor:
    """BatchTopK at inference: every pre-activation above the threshold calibrated in training."""
    return pre.relu() * (pre > sae.threshold).to(pre.dtype)


def _jumprelu(sae, pre: Tensor, x_norm: Tensor | None, k: int | None = None) -> Tensor:
    return jumprelu(pre, sae.threshold, sae.cfg.jumprelu_bandwidth)


def _gated(sae, pre: Tensor, x_norm: Tensor | None, k: int | None = None) -> Tensor:
    """The gate's sign picks the active latents (its Heaviside step passes no gradient: the gate trains through
    the auxiliary loss), the magnitude path gives their values."""
    return (sae.gate_pre_acts(x_norm) > 0).to(pre.dtype) * pre.relu()


def _gated_pre_acts(sae, xc: Tensor) -> Tensor:
    """The magnitude path π_mag: the gate's directions, rescaled per latent."""
    return xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag


# ---- loss terms ---------------------------------------------------------------------------------------
def squared_error(x_hat: Tensor, y: Tensor, weights: Tensor | None) -> Tensor:
    """Squared error summed over the output, averaged over tokens (weighted when weights are given)."""
    err = (x_hat - y).pow(2).sum(-1)
    return err.mean() if weights is None else (err * weights).mean()


def _l1(sae, b: LossInputs) -> dict[str, Tensor]:
    return {"l1": b.coefficient * (b.z * sae.decoder_norms()).sum(-1).mean()}


def _l0(sae, b: LossInputs) -> dict[str, Tensor]:
    l0 = step(b.pre, sae.threshold, sae.cfg.jumprelu_bandwidth).sum(-1)
    target = sae.cfg.target_l0
    penalty = l0 if target is None else 2 / target * (l0 - target).pow(2)
    return {"l0": b.coefficient * penalty.mean()}


def _gated_terms(sae, b: LossInputs) -> dict[str, Tensor]:
    """L1 on the gate (weighted by decoder norms), and the gate path reconstructing on its own through a frozen
    decoder, which is what trains the gate."""
    gate_relu = sae.gate_pre_acts(b.x_norm).relu()
    via_gate = gate_relu @ sae.W_dec.detach() + sae.b_dec.detach()
    if isinstance(b.skip, Tensor):  # a skip transcoder's term
        via_gate = via_gate + b.skip.detach()
    return {
        "l1": b.coefficient * (gate_relu * sae.decoder_norms()).sum(-1).mean(),
        "aux": (via_gate - b.y).pow(2).sum(-1).mean(),
    }


def _prefix_errors(sae, b: LossInputs) -> dict[str, Tensor]:
    """Matryoshka: every nested prefix of the latents reconstructs the target on its own (the full one is mse)."""
    out = {}
    for m in sae.cfg.matryoshka_groups[:-1]:
        prefix_hat = b.z[:, :m] @ sae.W_dec[:m] + sae.b_dec + b.skip + (0.0 if b.added is None else b.added)
        out[f"mse_{m}"] = squared_error(prefix_hat, b.y, b.weights)
    return out


# ---- sparse kernels' training path ------------------------------------------------------------------
def _sparse_topk(sae, xc: Tensor, k: int, dead: Tensor | None, k_aux: int, gemm_dtype: torch.dtype | None):
    return kernels.encode_select_topk(
        xc, sae.W_enc.detach(), sae.b_enc.detach(), k, dead=dead, k_aux=k_aux, gemm_dtype=gemm_dtype
    )


def _sparse_batch_topk(sae, xc: Tensor, k: int, dead: Tensor | None, k_aux: int, gemm_dtype: torch.dtype | None):
    with torch.no_grad():
        dt = gemm_dtype or xc.dtype
        pre = (xc.to(dt) @ sae.W_enc.to(dt)).to(xc.dtype)
        pre += sae.b_enc
    sel = kernels.select_batch_topk(pre, k)
    aux = kernels.per_token(*kernels.select_among(pre, dead, k_aux), sae.cfg.d_sae) if dead is not None else None
    return sel, aux


# ---- parameters ---------------------------------------------------------------------------------------
def _gated_parameters(d_sae: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {name: torch.zeros(d_sae, dtype=dtype) for name in ("b_gate", "r_mag", "b_mag")}


def _jumprelu_parameters(d_sae: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {"b_enc": torch.zeros(d_sae, dtype=dtype), "threshold": torch.full((d_sae,), 0.001, dtype=dtype)}


def _threshold_buffer(d_sae: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """BatchTopK's global inference threshold, estimated during training (train.losses.update_threshold)."""
    return {"threshold": torch.zeros((), dtype=dtype)}


@torch.no_grad()
def _clamp_threshold(sae) -> None:
    sae.threshold.clamp_(min=0.0)


RELU = register(Architecture("relu", _relu, loss_terms=_l1, dead_latents="resample", sparsity_coefficient=5.0))
TOPK = register(
    Architecture(
        "topk",
        _topk,
        sparse=_sparse_topk,
        selection="token",
        dead_latents="auxk",
        decoder_lr_scale=3.0,
        saelens_transcoder=False,
    )
)
BATCHTOPK = register(
    Architecture(
        "batchtopk",
        _batch_topk,
        infer=_above_threshold,
        buffers=_threshold_buffer,
        sparse=_sparse_batch_topk,
        selection="batch",
        dead_latents="auxk",
        decoder_lr_scale=3.0,
        saelens="jumprelu",
    )
)
JUMPRELU = register(
    Architecture(
        "jumprelu",
        _jumprelu,
        loss_terms=_l0,
        parameters=_jumprelu_parameters,
        after_step=_clamp_threshold,
        sparsity_coefficient=1.0,
        dead_latents="auxk",  # a latent below its threshold gets no gradient at all: AuxK's is the only way back
    )
)
GATED = register(
    Architecture(
        "gated",
        _gated,
        loss_terms=_gated_terms,
        parameters=_gated_parameters,
        pre_acts=_gated_pre_acts,
        sparsity_coefficient=5.0,
    )
)
MATRYOSHKA = register(
    Architecture(
        "matryoshka",
        _batch_topk,
        infer=_above_threshold,
        buffers=_threshold_buffer,
        loss_terms=_prefix_errors,
        selection="batch",
        nested=True,
        dead_latents="auxk",
        decoder_lr_scale=3.0,
        saelens="jumprelu",
    )
)
