"""JumpReLU and its step function, with the pseudo-derivatives JumpReLU SAEs train with.

Rajamanoharan et al. 2024 ("Jumping Ahead"): the step function H(pre - θ) has zero derivative almost
everywhere, so θ gets a straight-through estimate through a rectangle kernel of width ε instead:
  d/dθ JumpReLU(pre, θ) = -(θ/ε) · rect((pre - θ)/ε)
  d/dθ H(pre - θ)       = -(1/ε) · rect((pre - θ)/ε)
and pre gets the ordinary derivative of JumpReLU (1 where pre > θ) and none through H.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        gap = pre - threshold
        grad_pre = torch.where(gap > 0, grad_out, 0.0)
        in_kernel = _sum_to(torch.where(_in_band(gap, eps), grad_out, 0.0), threshold.shape)
        return grad_pre, -(threshold / eps) * in_kernel, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_kernel = _sum_to(torch.where(_in_band(pre - threshold, eps), grad_out, 0.0), threshold.shape)
        return None, -(1.0 / eps) * in_kernel, None


def _in_band(gap: Tensor, eps: float) -> Tensor:
    """rect(gap / ε) ≠ 0, i.e. |pre − θ| < ε/2, in two passes over the (batch, d_sae) gap (overwritten)."""
    return gap.abs_() < eps / 2


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient (batch, d_sae) back to the threshold's shape (d_sae,)."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    return grad


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """pre · 1[pre > θ], with the rectangle-kernel pseudo-derivative for θ."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """1[pre > θ] (counts active latents for the L0 penalty), pseudo-derivative for θ only."""
    return _Step.apply(pre, threshold, bandwidth)
