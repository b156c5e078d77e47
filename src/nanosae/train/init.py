"""Initialisation: b_dec at the geometric median (or mean) of a sample, decoder rows random unit vectors,
encoder the decoder's transpose (Gao et al. 2024), so the first steps already reconstruct sensibly."""

from __future__ import annotations

import torch
from torch import Tensor

from nanosae.errors import ConfigError
from nanosae.sae import SAE
from nanosae.train.losses import normalize_decoder


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the points."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


@torch.no_grad()
def init_sae(
    sae: SAE, sample: Tensor, b_dec: str = "geometric_median", target: Tensor | None = None, encoder_scale: float = 1.0
) -> None:
    """Set b_dec from a sample of (normalised) activations and tie W_enc to encoder_scale · W_dec.T.

    A transcoder's b_dec comes from its (normalised) target sample, and its encoder stays untied (input and
    output are different spaces; its random unit columns are scaled the same way)."""
    normalize_decoder(sae)
    if sae.cfg.kind != "transcoder":
        sae.W_enc.copy_(sae.W_dec.T)
    sae.W_enc.mul_(encoder_scale)
    outputs = sample if target is None else target
    if b_dec == "geometric_median":
        sae.b_dec.copy_(geometric_median(outputs))
    elif b_dec == "mean":
        sae.b_dec.copy_(outputs.mean(0))
    elif b_dec != "zeros":
        raise ConfigError(f"unknown b_dec init {b_dec!r}")
    if sae.cfg.target_l0 is not None:
        sae.threshold.fill_(l0_threshold(sae.pre_acts(sample[: max(1, 2**24 // sae.cfg.d_sae)]), sae.cfg.target_l0))


def l0_threshold(pre: Tensor, l0: float) -> float:
    """The one threshold under which the sample's tokens have `l0` pre-activations above it on average: a JumpReLU
    SAE trained towards an L0 starts there, since its thresholds move by about the learning rate per step."""
    above = max(1, round(l0 * pre.shape[0]))  # JumpReLU fires above θ: θ is the next value down
    if above >= pre.numel():
        return 0.0
    return max(float(pre.flatten().kthvalue(pre.numel() - above).values), 0.0)
