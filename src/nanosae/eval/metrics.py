"""Evaluate SAEs on a host model: reconstruction, sparsity, dead latents, and what splicing costs the model.

Per batch of held-out windows: one clean forward pass (logits + the activations at every SAE's hook)
shared by all SAEs, one ablation pass per hook, one spliced pass per SAE; the later passes replay the clean
pass's outputs of the blocks before the edited layer instead of recomputing them. Everything is accumulated in
running sums, so memory does not grow with the token count. Positions holding BOS or padding are left
out exactly as the collector leaves them out, for the activation metrics and for the CE/KL metrics
(a prediction counts when both the position it is made at and the token it predicts are kept), and the
SAE or the ablation replaces the activation only at kept positions: BOS keeps its own activation, as the
SAE was never trained on it (its huge attention-sink norm would otherwise dominate the CE loss).

Transcoders replace their output hook (e.g. the MLP's output: the CE-loss score with the MLP replaced by
the transcoder, against the MLP ablated); crosscoders replace every layer they read with its reconstruction.
Both are computed from the clean run's activations, which is what an SAE's splice computes too.

  fvu            = Σ‖x − x̂‖² / Σ‖x − mean(x)‖²   (explained_variance = 1 − fvu)
  mse            = mean over tokens and dimensions of (x − x̂)²
  ce_loss_score  = (ce_ablation − ce_with_sae) / (ce_ablation − ce_clean)
  kl_div         = mean KL(clean next-token distribution ‖ spliced one)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from nanosae.config import DataConfig
from nanosae.data.corpus import iter_documents
from nanosae.data.tokens import in_background, token_batches
from nanosae.errors import ConfigError, DataError
from nanosae.models import HostModel
from nanosae.sae import SAE
from nanosae.sae.model import concat_hooks

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense


@dataclass
class _Sums:
    """Running sums for one SAE (float64 so millions of tokens add up exactly enough)."""

    d_in: int  # the width of what is reconstructed (d_out)
    d_sae: int
    context: int
    n_blocks: int = 1
    n: int = 0
    sum_x: Tensor = None  # type: ignore[assignment]
    sum_x2: float = 0.0
    sum_err: float = 0.0
    sum_l0: float = 0.0
    sum_l0_sq: float = 0.0
    sum_l1: float = 0.0
    sum_cos: float = 0.0
    sum_rel_norm: float = 0.0
    fires: Tensor = None  # type: ignore[assignment]
    l0_hist: Tensor = None  # type: ignore[assignment]
    pos_n: Tensor = None  # type: ignore[assignment]
    pos_err: Tensor = None  # type: ignore[assignment]
    pos_x2: Tensor = None  # type: ignore[assignment]
    pos_x: Tensor = None  # type: ignore[assignment]
    ce_sae: float = 0.0
    kl: float = 0.0
    block_err: Tensor = None  # type: ignore[assignment]
    block_x2: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.block_err = torch.zeros(self.n_blocks, dtype=torch.float64)
        self.block_x2 = torch.zeros(self.n_blocks, dtype=torch.float64)
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.long)
        self.l0_hist = torch.zeros(self.d_sae + 1, dtype=torch.long)
        self.pos_n = torch.zeros(self.context, dtype=torch.float64)
        self.pos_err = torch.zeros(self.context, dtype=torch.float64)
        self.pos_x2 = torch.zeros(self.context, dtype=torch.float64)
        self.pos_x = torch.zeros(self.context, self.d_in, dtype=torch.float64)

    def add(self, x: Tensor, x_hat: Tensor, z: Tensor, positions: Tensor) -> None:
        if self.fires.device != x.device:  # sums live where the activations are (no copy of z per batch)
            for name, value in vars(self).items():
                if isinstance(value, Tensor):
                    setattr(self, name, value.to(x.device))
        x, x_hat, z, positions = x.double(), x_hat.double(), z.double(), positions.to(x.device)
        err = (x - x_hat).pow(2).sum(-1)
        l0 = (z != 0).sum(-1)
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_err += float(err.sum())
        self.sum_l0 += float(l0.sum())
        self.sum_l0_sq += float(l0.double().pow(2).sum())
        self.sum_l1 += float(z.abs().sum())
        self.sum_cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        self.sum_rel_norm += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        self.fires += (z != 0).sum(0)
        self.l0_hist += torch.bincount(l0, minlength=self.d_sae + 1)
        self.pos_n.index_add_(0, positions, torch.ones_like(err))
        self.pos_err.index_add_(0, positions, err)
        self.pos_x2.index_add_(0, positions, x.pow(2).sum(-1))
        self.pos_x.index_add_(0, positions, x)
        self.block_err += (x - x_hat).pow(2).view(len(x), self.n_blocks, -1).sum((0, 2))
        self.block_x2 += x.pow(2).view(len(x), self.n_blocks, -1).sum((0, 2))

    def total_variance(self) -> float:
        mean = self.sum_x / self.n
        return self.sum_x2 - self.n * float(mean.pow(2).sum())

    def fvu_by_layer(self) -> list[float]:
        """Crosscoders: the FVU of each layer's reconstruction."""
        mean_sq = (self.sum_x / self.n).pow(2).view(self.n_blocks, -1).sum(-1)
        return (self.block_err / (self.block_x2 - self.n * mean_sq).clamp_min(1e-12)).tolist()

    def fvu_by_position(self) -> list[float | None]:
        mean = self.sum_x / self.n
        var = self.pos_x2 - 2 * (self.pos_x @ mean) + self.pos_n * float(mean.pow(2).sum())
        return [float(e / v) if n > 0 and v > 0 else None for e, v, n in zip(self.pos_err, var, self.pos_n)]


Clean = list[tuple[Tensor, Tensor]]  # per row: the clean next-token probabilities and Σ p·log p per position


def _ce_and_kl(
    logits: Tensor, clean: Clean | None, tokens: Tensor, keep: Tensor, is_clean: bool = False
) -> tuple[float, float, Clean]:
    """Summed CE of next-token predictions at kept positions, and summed KL(clean ‖ this run) there when
    `clean` is given; for the clean run itself (is_clean), also what later runs' KL needs.

    Row by row in float32 (a row's log-probabilities are ~50 MB at a 50k vocabulary; float64 doubled the
    evaluation's time for no visible difference in the sums), over every position with the dropped ones
    masked out of the sums (copying out the kept rows cost more than computing them all). KL is written as
    Σ p·log p − Σ p·log q so each spliced run costs one dot product per position, not four vocabulary passes."""
    ce, kl, rows = 0.0, 0.0, []
    for b in range(logits.shape[0]):
        logq = F.log_softmax(logits[b, :-1].float(), dim=-1)
        kept = keep[b]
        ce -= float(logq.gather(1, tokens[b, 1:, None])[:, 0][kept].sum(dtype=torch.float64))
        if clean is not None:
            p, p_logp = clean[b]
            kl += float((p_logp - torch.linalg.vecdot(p, logq))[kept].sum(dtype=torch.float64))
        if is_clean:
            p = logq.exp()
            rows.append((p, torch.linalg.vecdot(p, logq)))
    return ce, kl, rows


def replace_kept(x: Tensor, valid: Tensor, new: Tensor) -> Tensor:
    """new at kept positions; BOS/padding keep the model's own activation (the SAE never saw them)."""
    out = x.clone()
    out[valid] = new.to(x.dtype)
    return out


def _io_hooks(sae: SAE, hook: str | None, model: HostModel) -> tuple[list[str], list[str]]:
    """(input hooks, output hooks) of an SAE on this model, checked against its widths."""
    if hook and sae.cfg.kind != "sae":
        raise ConfigError(
            f"a {sae.cfg.kind} reads {sae.cfg.input_hooks} and writes {sae.cfg.output_hooks}; --hook is for plain SAEs"
        )
    ins, outs = ([hook], [hook]) if hook else (sae.cfg.input_hooks, sae.cfg.output_hooks)
    for hooks, width, name in ((ins, sae.cfg.d_in, "d_in"), (outs, sae.cfg.d_out, "d_out")):
        if not all(hooks):
            raise ConfigError("the SAE does not say which hook it reads (cfg.hook_name); pass --hook")
        got = sum(model.hook_dim(h) for h in hooks)
        if got != width:
            raise ConfigError(f"{', '.join(hooks)} have width {got} but the SAE expects {name}={width}")
    return ins, outs


def _returning(value: Tensor) -> Callable[[Tensor], Tensor]:
    """A hook that replaces what it sees with value."""
    return lambda _: value


@overload
def evaluate(
    saes: SAE,
    model: HostModel,
    data: DataConfig | list[str] | str,
    tokens: int = 20_000,
    batch_size: int = 8,
    ablation: str = "zero",
    hooks: list[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]: ...


@overload
def evaluate(
    saes: list[SAE],
    model: HostModel,
    data: DataConfig | list[str] | str,
    tokens: int = 20_000,
    batch_size: int = 8,
    ablation: str = "zero",
    hooks: list[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, Any]]: ...


@torch.no_grad()
def evaluate(
    saes: SAE | list[SAE],
    model: HostModel,
    data: DataConfig | list[str] | str,
    tokens: int = 20_000,
    batch_size: int = 8,
    ablation: str = "zero",
    hooks: list[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Metrics for one SAE (a dict) or several evaluated on the same tokens (a list of dicts).

    data: a DataConfig, or corpus specs (then the held-out split is used). hooks: where each plain SAE sits
    (default: its cfg.hook_name). ablation: 'zero' or 'mean' (the batch's mean activation) of what the SAE
    replaces (a transcoder: its output hook, e.g. the MLP's output).
    """
    single = isinstance(saes, SAE)
    sae_list: list[SAE] = [saes] if isinstance(saes, SAE) else list(saes)
    if ablation not in ("zero", "mean"):
        raise ConfigError(f"unknown ablation {ablation!r}; expected zero or mean")
    if not isinstance(data, DataConfig):
        data = DataConfig(specs=[data] if isinstance(data, str) else list(data), split="eval")
    io = [_io_hooks(sae, hook, model) for sae, hook in zip(sae_list, list(hooks) if hooks else [None] * len(sae_list))]
    for sae in sae_list:
        sae.eval()
    unique_hooks = list(dict.fromkeys(h for ins, outs in io for h in ins + outs))
    ablated = list(dict.fromkeys(tuple(outs) for _, outs in io))  # one ablation pass per replaced hook set
    prefix = {group: model.unchanged_blocks(list(group)) for group in ablated}  # blocks the edits leave as they are
    sums = [_Sums(s.cfg.d_out, s.cfg.d_sae, data.context_size, s.cfg.n_blocks) for s in sae_list]
    ce_clean, ce_ablation = 0.0, {group: 0.0 for group in ablated}
    n_pred, done, t0 = 0, 0, time.perf_counter()
    batches = in_background(
        token_batches(
            iter_documents(data), model.tokenizer, data.context_size, batch_size, data.pack, data.exclude_first
        )
    )
    for batch in batches:
        rows = int((batch.valid.sum(1).cumsum(0) < tokens - done).sum()) + 1  # no more windows than needed
        toks, valid = batch.tokens[:rows].to(model.device), batch.valid[:rows].to(model.device)
        keep = valid[:, :-1] & valid[:, 1:]  # predictions from a kept position of a kept token
        with model.recording_blocks(max(prefix.values())) as clean_blocks:
            logits, cache = model.run_with_cache(toks, unique_hooks)
        ce, _, clean = _ce_and_kl(logits, None, toks, keep, is_clean=True)
        ce_clean += ce
        n_pred += int(keep.sum())
        for group in ablated:
            edits = {h: _ablated(cache[h], valid, ablation) for h in group}
            with model.replaying_blocks(clean_blocks[: prefix[group]]), model.hooks(edits):
                ce_ablation[group] += _ce_and_kl(model.forward(toks), None, toks, keep)[0]
        positions = torch.arange(toks.shape[1], device=toks.device).expand_as(toks)[valid].cpu()
        for sae, (ins, outs), s in zip(sae_list, io, sums):
            x_hat, z = sae(sae.gather_input(cache, ins)[valid])
            s.add(concat_hooks(cache, outs)[valid].cpu(), x_hat.float().cpu(), z.float().cpu(), positions)
            edits = {
                h: _returning(replace_kept(cache[h], valid, block))
                for h, block in sae.output_blocks(x_hat, outs).items()
            }
            with model.replaying_blocks(clean_blocks[: prefix[tuple(outs)]]), model.hooks(edits):
                ce, kl, _ = _ce_and_kl(model.forward(toks), clean, toks, keep)
            s.ce_sae += ce
            s.kl += kl
        done += int(valid.sum())
        if progress is not None:
            progress(min(done, tokens), tokens, time.perf_counter() - t0)
        if done >= tokens:
            break
    batches.close()  # stops and joins the prefetch thread now, not at garbage collection
    if done == 0:
        raise DataError(f"no evaluation tokens from {', '.join(data.specs)} (split {data.split!r})")
    results = [
        _finish(s, sae, ins, outs, ce_clean, ce_ablation[tuple(outs)], n_pred, ablation)
        for s, sae, (ins, outs) in zip(sums, sae_list, io)
    ]
    return results[0] if single else results


def _ablated(x: Tensor, valid: Tensor, ablation: str) -> Callable[[Tensor], Tensor]:
    """A hook putting zeros or the batch's mean activation at the kept positions (BOS/padding keep theirs)."""
    fill = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device) if ablation == "zero" else x[valid].mean(0)
    replaced = torch.where(valid[..., None], fill, x)
    return lambda _: replaced


def _finish(
    s: _Sums, sae: SAE, ins: list[str], outs: list[str], ce_clean: float, ce_abl: float, n_pred: int, ablation: str
) -> dict[str, Any]:
    fvu = s.sum_err / max(s.total_variance(), 1e-12)
    density = s.fires.double() / s.n
    clean, with_sae, abl = ce_clean / n_pred, s.ce_sae / n_pred, ce_abl / n_pred
    l0 = s.sum_l0 / s.n
    extra: dict[str, Any] = {}
    if sae.cfg.kind == "transcoder":
        extra = {"hook_out": outs[0]}
    elif sae.cfg.kind == "crosscoder":
        extra = {"hooks": outs, "fvu_by_layer": s.fvu_by_layer()}
    return {
        "hook": ins[0],
        "kind": sae.cfg.kind,
        **extra,
        "architecture": sae.cfg.architecture,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "tokens": s.n,
        "mse": s.sum_err / (s.n * s.d_in),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": l0,
        "l0_std": math.sqrt(max(0.0, s.sum_l0_sq / s.n - l0 * l0)),
        "l1": s.sum_l1 / s.n,
        "dead_fraction": float((s.fires == 0).double().mean()),
        "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
        "cosine_similarity": s.sum_cos / s.n,
        "relative_reconstruction_norm": s.sum_rel_norm / s.n,
        "ce_loss_clean": clean,
        "ce_loss_with_sae": with_sae,
        "ce_loss_with_ablation": abl,
        "ablation": ablation,
        "ce_loss_score": (abl - with_sae) / (abl - clean) if abl != clean else float("nan"),
        "kl_div": s.kl / n_pred,
        "feature_density": density.tolist(),
        "l0_histogram": s.l0_hist[: int(s.l0_hist.nonzero().max()) + 1].tolist(),
        "fvu_by_position": s.fvu_by_position(),
    }
