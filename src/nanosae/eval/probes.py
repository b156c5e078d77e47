"""Linear probes for the evaluations that ask what activations and latents *carry*: logistic regression
(full-batch L-BFGS on centred inputs divided by one overall scale, so the L2 penalty is the same in every
direction and a probe's weight vector is a direction of the input space; weights returned in the input's
own units) and k-sparse probes
on SAE latents (the k latents whose mean activation differs most between the classes, then a probe on
those alone, as SAEBench's sparse probing does)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Probe(NamedTuple):
    weight: Tensor  # (d,) or (d, classes), in the input's units
    bias: Tensor  # () or (classes,)

    def scores(self, x: Tensor) -> Tensor:
        return x.float() @ self.weight + self.bias


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """Logistic probe(s): y (n,) of 0/1 gives one, y (n, c) gives c independent one-vs-rest probes. Classes are
    weighted to balance (positives count as much as negatives); l2 is on the weights of the scaled inputs.
    (Per-dimension standardisation would favour rare dimensions that happen to separate the training set.)"""
    x = x.float()
    y = y.float()
    single = y.dim() == 1
    if single:
        y = y[:, None]
    mean = x.mean(0)
    std = (x - mean).pow(2).sum(1).mean().sqrt().clamp_min(1e-6)  # one scale: the rms norm of the centred inputs
    xs = (x - mean) / std
    pos = y.sum(0).clamp_min(1)
    pos_weight = (len(y) - y.sum(0)).clamp_min(1) / pos
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (
            F.binary_cross_entropy_with_logits(xs @ w + b, y, pos_weight=pos_weight) + l2 * w.pow(2).sum() / y.shape[1]
        )
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w / std).detach()
    bias = (b - (mean / std) @ w).detach()
    return Probe(weight[:, 0], bias[0]) if single else Probe(weight, bias)


def accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    return float(((probe.scores(x) > 0) == y.bool()).float().mean())


def f1(predicted: Tensor, y: Tensor) -> float:
    predicted, y = predicted.bool(), y.bool()
    tp = float((predicted & y).sum())
    return 2 * tp / max(1.0, float(predicted.sum() + y.sum()))


def top_latents(z: Tensor, y: Tensor, k: int, signed: bool = False) -> Tensor:
    """The k latents whose mean activation differs most between positives and negatives (signed: only those
    higher on the positives, i.e. latents that fire *for* the class)."""
    y = y.bool()
    diff = z[y].float().mean(0) - z[~y].float().mean(0)
    return (diff if signed else diff.abs()).topk(min(k, z.shape[1])).indices


def k_sparse_probe(z: Tensor, y: Tensor, k: int, signed: bool = False) -> tuple[Tensor, Probe]:
    """(latent ids, probe on those latents alone)."""
    ids = top_latents(z, y, k, signed)
    return ids, fit_logistic(z[:, ids], y)
