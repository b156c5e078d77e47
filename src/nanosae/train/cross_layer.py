"""Cross-layer transcoders (Ameisen et al. 2025): each layer's features read that layer's MLP input and write to
its own MLP output and to every later one in the set.

They train as a per-layer set does (one SAERun per layer: its encoder, own decoder and skip, dead-latent counters,
metrics and files), plus the decoders to later layers, held here. Layer j's prediction is its own decode plus
Σ_{i<j} z_i·C_{i→j}, so one backward pass over the sum of every layer's loss trains them together. A feature's
decoder rows (own and later layers) are kept at unit norm jointly. The later-layer decoders start at zero, so
training starts from the per-layer set and learns what earlier features can say about later MLPs.

Files: RUN/layer_L/sae as for a per-layer set (encoder, own decoder), RUN/layer_L/cross_decoder.safetensors
(`W_dec_later`, (d_sae, n_later, d_model), in each later layer's normalised output units, as W_dec is in its own),
RUN/cross_layer/checkpoints/step_N at the same steps as the layers'.
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanosae import registry
from nanosae.config import TrainConfig
from nanosae.errors import ConfigError, FormatError, TrainingError, first_line
from nanosae.io import atomic_write, regular_file
from nanosae.sae import kernels
from nanosae.train.checkpoint import load_checkpoint, save_checkpoint
from nanosae.train.schedule import lr_at

if TYPE_CHECKING:
    from nanosae.train.trainer import SAERun

CROSS_FILE = "cross_decoder.safetensors"


def check_cross_layer(cfgs: list[TrainConfig], world: int) -> None:
    """Refuse what a cross-layer transcoder cannot train with, before any run directory is touched."""
    cfg = cfgs[0]
    if any(c.sae.arch.sparse is None for c in cfgs):
        raise ConfigError(
            f"cross-layer transcoders are TopK or BatchTopK, trained on the sparse kernels "
            f"(--architecture {' or '.join(registry.sparse_names())})"
        )
    if len(cfgs) < 2:
        raise ConfigError("a cross-layer transcoder needs at least two layers (--transcoders all, or 0,1,...)")
    if world > 1 or cfg.shard_latents or cfg.distribute_saes:
        raise ConfigError("cross-layer transcoders train in one process (no torchrun)")
    if cfg.optim.ema_decay or cfg.optim.kl_finetune:
        raise ConfigError("cross-layer transcoders take neither --ema-decay nor --kl-finetune")


class CrossLayer:
    """The decoders from each layer's latents to every later layer's MLP output, and the joint step."""

    def __init__(self, runs: list[SAERun], run_dir: Path, resume_steps: set[int] | None = None):
        cfg = runs[0].cfg
        self.runs = runs
        self.path = run_dir / "cross_layer"
        n, d_model = len(runs), runs[0].sae.cfg.d_out
        self.decoders = [
            torch.zeros(r.sae.cfg.d_sae, (n - 1 - i) * d_model, device=cfg.device, requires_grad=True)
            for i, r in enumerate(runs[:-1])
        ]
        o = cfg.optim
        self.opt = torch.optim.Adam(self.decoders, lr=o.lr or 0.0, betas=(o.beta1, o.beta2), eps=o.eps)
        self.step = runs[0].step
        found = load_checkpoint(self.path, resume_steps) if cfg.resume else None
        if found is not None:
            _, state, _ = found
            with torch.no_grad():
                for w, saved in zip(self.decoders, state["decoders"]):
                    w.copy_(saved)
            self.opt.load_state_dict(state["optimizer"])
            self.step = state["step"]
        if any(r.step != self.step for r in runs):
            raise TrainingError(
                f"{self.path}: the cross-layer decoders are at step {self.step}, the layers at "
                f"{sorted({r.step for r in runs})}; train again into a new --out"
            )
        for r in runs:
            r.unit_decoder = False  # normalised jointly with the later-layer rows, below
        if self.step == 0:
            self.normalize()

    def train_step(self, batch: list[torch.Tensor]) -> list[dict[str, float] | None]:
        """One step of every layer and of the later-layer decoders; each layer's metrics (when logged)."""
        runs, device = self.runs, self.runs[0].cfg.device
        pending: dict[int, torch.Tensor] = {}
        steps = []
        for i, r in enumerate(runs):
            x, y = r.gather(batch, r.ins).to(device), r.gather(batch, r.outs).to(device)
            out = r.loss_on(x, y, added=pending.pop(i, None))
            steps.append((out, x, y))
            if i < len(self.decoders):
                assert out.codes is not None  # TopK/BatchTopK: the sparse path's codes
                vals, sel = out.codes
                later = kernels.sparse_decode(vals, sel, self.decoders[i]).view(len(x), len(runs) - 1 - i, -1)
                for j in range(i + 1, len(runs)):
                    pending[j] = pending[j] + later[:, j - i - 1] if j in pending else later[:, j - i - 1]
        for r in runs:
            r.opt.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        functools.reduce(operator.add, (out.loss for out, _, _ in steps)).backward()
        lr = lr_at(self.step, runs[0].cfg, runs[0].d)
        for group in self.opt.param_groups:
            group["lr"] = lr * runs[0].d.decoder_lr_scale  # decoders, as the layers' own (trainer.make_adam)
        if runs[0].cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.decoders, runs[0].cfg.optim.grad_clip)
        self.opt.step()
        metrics = [r.apply_step(*step) for r, step in zip(runs, steps)]
        self.normalize()
        self.step += 1
        return metrics

    @torch.no_grad()
    def normalize(self) -> None:
        """Each feature's decoder rows, own and later layers together, to unit norm."""
        for i, r in enumerate(self.runs):
            own = r.sae.W_dec
            sq = own.pow(2).sum(1)
            if i < len(self.decoders):
                sq = sq + self.decoders[i].pow(2).sum(1)
            norm = sq.sqrt().clamp_min(1e-12)[:, None]
            own.div_(norm)
            if i < len(self.decoders):
                self.decoders[i].div_(norm)

    def after_step(self) -> None:
        cfg = self.runs[0].cfg
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not self.runs[0].done:
            self.checkpoint()

    def checkpoint(self) -> None:
        save_checkpoint(
            self.path,
            self.step,
            None,
            {
                "step": self.step,
                "batches": self.runs[0].batches_done,
                "optimizer": self.opt.state_dict(),
                "decoders": [w.detach().cpu() for w in self.decoders],
            },
        )

    def finish(self) -> None:
        """Each layer's later-layer decoders beside its SAE (after the layers' finish wrote theirs)."""
        n, d_model = len(self.runs), self.runs[0].sae.cfg.d_out
        for i, (r, w) in enumerate(zip(self.runs, self.decoders)):
            rows = w.detach().cpu().reshape(-1, n - 1 - i, d_model).contiguous()
            later = ",".join(str(layer_of(q)) for q in self.runs[i + 1 :])

            def write(p: Path, rows: torch.Tensor = rows, later: str = later) -> None:
                save_file({"W_dec_later": rows}, str(p), metadata={"later_layers": later})

            atomic_write(r.run_dir / CROSS_FILE, write)
        self.checkpoint()


def layer_of(run: SAERun) -> int:
    """The layer a set's run belongs to, from its input hook (blocks.L.ln2.hook_normalized)."""
    return int(run.sae.cfg.hook_name.split(".")[1])


def load_later(run_dir: Path, later: list[int], d_sae: int, d_model: int, device: str = "cpu") -> torch.Tensor:
    """A layer's decoders to the later layers (d_sae, n_later, d_model), checked against the set (FormatError
    naming the file)."""
    path = regular_file(run_dir / CROSS_FILE)
    try:
        with safe_open(str(path), "pt", device=device) as f:
            layers, rows = (f.metadata() or {}).get("later_layers"), f.get_tensor("W_dec_later")
    except Exception as e:  # missing, truncated or not safetensors
        raise FormatError(f"{path}: cannot read the cross-layer decoders ({first_line(e)})") from None
    expected = ",".join(map(str, later))
    if layers != expected or tuple(rows.shape) != (d_sae, len(later), d_model):
        raise FormatError(
            f"{path}: decoders to layers {layers} of shape {tuple(rows.shape)}; expected layers {expected} "
            f"and shape ({d_sae}, {len(later)}, {d_model})"
        )
    if not rows.is_floating_point() or not bool(torch.isfinite(rows).all()):
        raise FormatError(f"{path}: the cross-layer decoders hold NaN, infinite or non-float values")
    return rows
