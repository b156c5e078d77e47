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
    sample = sample if target is None else target
    if b_dec == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample))
    elif b_dec == "mean":
        sae.b_dec.copy_(sample.mean(0))
    elif b_dec != "zeros":
        raise ConfigError(f"unknown b_dec init {b_dec!r}")
