"""Latents sharded over processes, for dictionaries too large for one device (torchrun ... --shard-latents N).

Each of N ranks holds a contiguous slice of the latents: those columns of W_enc and b_enc, those rows of W_dec,
and their Adam state; b_dec (and a transcoder's W_skip) is on every rank. One TopK step:
  1. every rank encodes the whole batch with its slice and takes its local top k (and AuxK's local top k_aux
     among its dead latents): a token's global top k is among the N·k local candidates;
  2. the candidates are all-gathered and every rank takes the same global top k, keeping the winners it holds;
  3. each rank decodes its winners and the partial reconstructions are summed with all_reduce, so every rank
     holds the same x_hat and the same loss; backward then touches only the rank's own latents;
  4. b_dec's gradient through the encoder (−W_enc @ ∂L/∂b_enc, summed over slices) is all-reduced.
The result equals a single-process step up to the order of float sums. With a world larger than N the ranks
form world/N replicas of the N slices (data parallel): replica r trains on its part of each batch and the
replicas average their gradients, as plain data parallelism does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nanosae.errors import ConfigError, FormatError
from nanosae.io import atomic_write
from nanosae.sae import SAE, kernels
from nanosae.train.losses import LossOutput, sparse_loss
from nanosae.train.schedule import default_k_aux

SHARDED = ("W_enc", "b_enc", "W_dec")  # the parameters split by latent; the rest is on every rank


@dataclass
class Shards:
    """Where this rank sits: which slice of the latents it holds and which part of each batch it trains on."""

    index: int  # the slice this rank holds
    n: int  # slices
    replica: int  # the data-parallel replica this rank belongs to
    replicas: int
    d_sae: int
    group: Any  # the ranks holding the slices of this replica (top-k gather, decode sum)
    replica_group: Any  # the ranks holding this same slice (gradient mean)

    @property
    def cols(self) -> slice:
        width = self.d_sae // self.n
        return slice(self.index * width, (self.index + 1) * width)


def make_shards(n: int, rank: int, world: int, d_sae: int) -> Shards:
    """Ranks r·n … r·n+n−1 hold the n slices of replica r. Every rank creates every group, in the same order."""
    if world % n:
        raise ConfigError(f"--shard-latents {n} does not divide the {world} processes (world must be a multiple)")
    if d_sae % n:
        raise ConfigError(f"d_sae {d_sae} is not divisible into {n} latent shards")
    replicas = world // n
    groups = [dist.new_group([r * n + s for s in range(n)]) for r in range(replicas)]
    replica_groups = [dist.new_group([r * n + s for r in range(replicas)]) for s in range(n)]
    return Shards(rank % n, n, rank // n, replicas, d_sae, groups[rank // n], replica_groups[rank % n])


def check_shardable(cfg: Any) -> None:
    """What sharded training supports: TopK dictionaries from stores or a stream, without the KL fine-tune."""
    if cfg.sae.arch.selection != "token" or cfg.sae.arch.sparse is None:
        raise ConfigError(f"--shard-latents trains TopK dictionaries (got --architecture {cfg.sae.architecture})")
    if cfg.optim.kl_finetune:
        raise ConfigError("--shard-latents and --kl-finetune cannot be combined")


@torch.no_grad()
def local_slice(full: SAE, shards: Shards, device: str) -> SAE:
    """The rank's SAE: the full one's latents in shards.cols (a copy), the shared parameters as they are."""
    cfg = type(full.cfg)(**{**vars(full.cfg), "d_sae": shards.d_sae // shards.n, "device": device})
    local = SAE(cfg)
    state = full.state_dict()
    cols = shards.cols
    cut = {"W_enc": lambda t: t[:, cols], "b_enc": lambda t: t[cols], "W_dec": lambda t: t[cols]}
    local.load_state_dict({k: cut.get(k, lambda t: t)(v).contiguous() for k, v in state.items()})
    local.train(full.training)
    return local


@torch.no_grad()
def gather_full(local: SAE, shards: Shards, d_sae: int) -> SAE:
    """The whole SAE from every slice (on every rank of the replica), for saving as the ordinary single file."""
    cfg = type(local.cfg)(**{**vars(local.cfg), "d_sae": d_sae, "device": "cpu"})
    full = SAE(cfg)
    state = {}
    for name, t in local.state_dict().items():
        t = t.cpu()
        if name in SHARDED:
            parts = [torch.empty_like(t) for _ in range(shards.n)]
            dist.all_gather(parts, t.contiguous(), group=shards.group)
            t = torch.cat(parts, dim=1 if name == "W_enc" else 0)
        state[name] = t
    full.load_state_dict(state)
    full.train(local.training)
    return full


def _global_top(vals: Tensor, idx: Tensor, k: int, shards: Shards) -> tuple[Tensor, Tensor]:
    """Each token's k largest among every slice's candidates (vals, global latent indices; (B, c) each)."""
    gathered_v = [torch.empty_like(vals) for _ in range(shards.n)]
    gathered_i = [torch.empty_like(idx) for _ in range(shards.n)]
    dist.all_gather(gathered_v, vals.contiguous(), group=shards.group)
    dist.all_gather(gathered_i, idx.contiguous(), group=shards.group)
    all_v, all_i = torch.cat(gathered_v, 1), torch.cat(gathered_i, 1)
    top_v, pos = all_v.topk(k, dim=-1, sorted=False)
    return top_v, all_i.gather(1, pos)


def _mine(vals: Tensor, idx: Tensor, shards: Shards) -> kernels.Selection:
    """The global winners held by this rank, as a Selection over its own latents (a token may have none)."""
    cols = shards.cols
    mask = (idx >= cols.start) & (idx < cols.stop)
    rows, which = mask.nonzero(as_tuple=True)
    return kernels.by_row(rows, idx[rows, which] - cols.start, vals[rows, which], len(idx), cols.stop - cols.start)


def _summed(partial: Tensor, shards: Shards) -> Tensor:
    """The sum of every slice's partial reconstruction, with the gradient flowing into this slice's part."""
    total = partial.detach().clone()
    dist.all_reduce(total, group=shards.group)
    return partial + (total - partial.detach())


def sharded_loss(
    sae: SAE,
    x: Tensor,
    target: Tensor | None,
    shards: Shards,
    *,
    k: int | None = None,
    dead_mask: Tensor | None,
    k_aux: int | None,
    aux_coefficient: float,
    norm_weighting: float = 0.0,
    encoder_bf16: bool = False,
) -> LossOutput:
    """train.losses.sae_loss for a TopK SAE whose latents are spread over the ranks of shards.group: each rank
    selects among its own latents, the global top k of every token is agreed, and losses.sparse_loss takes it
    from there with the reconstruction summed over the ranks.

    dead_mask covers every latent (each rank tracks all of them). `fired` covers every latent too."""
    x_norm, _ = sae.normalize_input(sae.check_input(x))
    y = x_norm if target is None else sae.normalize_target(target)
    k, k_aux = k or sae.k, k_aux or default_k_aux(sae.cfg.d_in)
    offset = shards.cols.start
    n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    dead_local = dead_mask[shards.cols].nonzero().squeeze(1) if dead_mask is not None and n_dead else None
    if dead_local is not None and not len(dead_local):
        dead_local = None  # dead latents elsewhere only: this slice offers no AuxK candidates
    xc = sae.centre(x_norm).detach()
    sel, aux = kernels.encode_select_topk(
        xc,
        sae.W_enc.detach(),
        sae.b_enc.detach(),
        k,
        dead=dead_local,
        k_aux=k_aux,
        gemm_dtype=torch.bfloat16 if encoder_bf16 else None,
    )
    local = sel.pre.view(len(x), k), sel.cols.view(len(x), k) + offset
    sel = _mine(*_global_top(*local, k, shards), shards)
    if n_dead:  # AuxK: the global top k_aux among the dead latents of every slice (padded to k_aux candidates each)
        cand_v = torch.full((len(x), k_aux), float("-inf"), dtype=xc.dtype, device=xc.device)
        cand_i = torch.zeros((len(x), k_aux), dtype=torch.long, device=xc.device)
        if aux is not None:
            width = len(aux.cols) // len(x)
            cand_v[:, :width] = aux.pre.view(len(x), width)
            cand_i[:, :width] = aux.cols.view(len(x), width) + offset
        aux = _mine(*_global_top(cand_v, cand_i, min(k_aux, n_dead), shards), shards)
    out = sparse_loss(
        sae,
        x_norm,
        xc,
        y,
        sel,
        aux if n_dead else None,
        aux_coefficient,
        norm_weighting,
        total=lambda partial: _summed(partial, shards),
    )
    fired = [torch.empty_like(out.fired) for _ in range(shards.n)]
    dist.all_gather(fired, out.fired, group=shards.group)
    return out._replace(fired=torch.cat(fired), codes=None)


def reduce_gradients(sae: SAE, shards: Shards, fired: Tensor) -> None:
    """After backward: add b_dec's gradient through every slice's encoder, then average every gradient (and
    the fired counts) over the replicas."""
    if sae.cfg.apply_b_dec_to_input and sae.b_enc.grad is not None and sae.b_dec.grad is not None:
        through_encoder = -(sae.W_enc.detach() @ sae.b_enc.grad)  # Σ_tokens ∂pre/∂b_dec = −W_enc @ ∂L/∂b_enc
        dist.all_reduce(through_encoder, group=shards.group)
        sae.b_dec.grad += through_encoder
    if shards.replicas > 1:
        for t in [p.grad for p in sae.parameters() if p.grad is not None] + [fired]:
            dist.all_reduce(t, group=shards.replica_group)
            t.div_(shards.replicas)


def clip_gradients(sae: SAE, shards: Shards, max_norm: float) -> None:
    """clip_grad_norm_ over the whole SAE: the sliced parameters' squares summed over the slices, the shared
    ones counted once."""
    grads = {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}
    sliced = torch.stack([g.pow(2).sum() for n, g in grads.items() if n in SHARDED]).sum()
    dist.all_reduce(sliced, group=shards.group)
    shared = sum((g.pow(2).sum() for n, g in grads.items() if n not in SHARDED), sliced.new_zeros(()))
    coef = (max_norm / ((sliced + shared).sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(coef)


# ---- checkpoints: each slice writes its own file; rank 0 moves them into the step's directory ---------------
def shard_file(root: Path, step: int, index: int, n: int) -> Path:
    """Where slice `index` writes its state before rank 0 moves it into checkpoints/step_N/."""
    return root / f".step_{step}.{shard_names(n)[index]}"


def save_shard(root: Path, step: int, shards: Shards, state: dict[str, Any]) -> None:
    """This slice's weights, Adam state and EMA, written atomically (replica 0 only: replicas are identical)."""
    if shards.replica == 0:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(shard_file(root, step, shards.index, shards.n), lambda tmp: torch.save(state, tmp))


def shard_names(n: int) -> list[str]:
    """The shard files inside a checkpoint directory."""
    return [f"shard-{i}-of-{n}.pt" for i in range(n)]


def load_shard(ckpt: Path, shards: Shards) -> dict[str, Any]:
    path = ckpt / shard_names(shards.n)[shards.index]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(
            f"{path}: this slice's checkpoint cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or not {"sae", "optimizer"} <= set(state):
        raise FormatError(f"{path}: not a nanosae shard checkpoint")
    return state
