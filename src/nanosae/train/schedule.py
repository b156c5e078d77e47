"""The run's schedule: its budget in steps, the learning rate, k and EMA over the steps, and every training
default derived from the budget or the architecture (the one place they are computed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanosae.config import TrainConfig


def default_k_aux(d_in: int) -> int:
    """Dead latents AuxK uses per token: half the input width (Gao et al.)."""
    return max(1, d_in // 2)


@dataclass(frozen=True)
class Schedule:
    """The run's budget in steps and the knobs left as None, derived from the budget (what we would pick by hand)."""

    steps: int
    lr: float
    warmup: int
    sparsity_warmup: int
    sparsity: float
    dead_tokens: int
    resample_every: int
    kl_steps: int  # the last steps, trained end to end (train.finetune)
    decoder_lr_scale: float
    k_aux: int | None  # None until the input width is known

    @classmethod
    def of(cls, cfg: TrainConfig, d_in: int | None = None) -> Schedule:
        """cfg's schedule; d_in (the source's width) for the defaults that depend on it."""
        o = cfg.optim
        steps = max(1, o.tokens // o.batch_size)
        arch = cfg.sae.arch
        sparsity = o.sparsity_coefficient if o.sparsity_coefficient is not None else arch.sparsity_coefficient
        default = lambda value, fallback: value if value is not None else fallback
        # the rate falls as latents grow (sparsify's rule) and follows the batch by Adam's square-root rule
        lr = 6.63e-4 / math.sqrt(cfg.sae.d_sae / 2**14) * math.sqrt(o.batch_size / 1024)
        return cls(
            steps=steps,
            lr=default(o.lr, lr),
            warmup=default(o.lr_warmup_steps, max(1, steps // 20)),
            sparsity_warmup=default(o.sparsity_warmup_steps, steps // 20),
            sparsity=sparsity,
            dead_tokens=default(o.dead_tokens, max(o.batch_size, min(10_000_000, o.tokens // 20))),
            resample_every=default(o.resample_every, max(10, steps // 8)),
            kl_steps=min(steps, round(steps * o.kl_finetune)),
            decoder_lr_scale=default(o.decoder_lr_scale, arch.decoder_lr_scale),
            k_aux=default(o.k_aux, default_k_aux(d_in) if d_in else None),
        )


def lr_at(step: int, cfg: TrainConfig, d: Schedule) -> float:
    """Linear warm-up, then constant / cosine / linear decay over the last lr_decay_fraction of the run."""
    if step < d.warmup:
        return d.lr * (step + 1) / d.warmup
    decay_start = d.steps * (1 - cfg.optim.lr_decay_fraction) if cfg.optim.lr_schedule != "constant" else d.steps
    if step < decay_start:
        return d.lr
    frac = (step - decay_start) / max(1.0, d.steps - decay_start)
    if cfg.optim.lr_schedule == "cosine":
        return d.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return d.lr * (1 - frac)


def k_at(step: int, cfg: TrainConfig, d: Schedule) -> int | None:
    """k for this step: k_start falling linearly to k over the first k_anneal of the run, then k."""
    k = cfg.sae.k if cfg.sae.arch.uses_k else None
    if k is None or not cfg.optim.k_anneal:
        return k
    start = cfg.optim.k_start or 4 * k
    span = max(1, round(d.steps * cfg.optim.k_anneal))
    return k if step >= span else round(start + (k - start) * step / span)


def ema_decay_at(step: int, decay: float) -> float:
    """The weight average's decay at update `step` (0-based), warmed up as min(decay, (1+step)/(10+step)) like
    TensorFlow's ExponentialMovingAverage(num_updates): with a fixed decay, a short run's average would still
    be mostly the random initialisation."""
    return min(decay, (1 + step) / (10 + step))
