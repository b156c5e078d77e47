"""Train one SAE: a flat loop you can read on one screen.

    batches (store on disk or straight from the model)
      -> loss (sparse kernels for topk/batchtopk, AuxK for dead latents)
      -> backward -> all-reduce (torchrun) -> decoder-parallel grad removed -> clip -> Adam -> unit-norm decoder
      -> dead-latent counters, resampling (relu), EMA, metrics.jsonl, checkpoints

Exact resume: a checkpoint holds the SAE, Adam state, step, batches consumed, RNG states, dead-latent
counters and EMA weights; the data order depends only on (seed, batch index), so a resumed CPU run ends
with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, overload

import torch
import torch.distributed as dist

from nanosae.config import TrainConfig, model_dtype
from nanosae.data import ActivationStore, ActivationStream
from nanosae.data.collect import check_pair
from nanosae.data.store import check_same_tokens, norm_scale
from nanosae.errors import ConfigError, DataError, FormatError, TrainingError
from nanosae.io import parse_json, read_json, write_json, write_lock
from nanosae.outputs import check_job_dir
from nanosae.rundir import RunDir
from nanosae.sae import SAE
from nanosae.sae.formats import save_sae
from nanosae.train.checkpoint import (
    common_steps,
    compare_jobs,
    job_identity,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    saved_job,
    store_fingerprint,
)
from nanosae.train.cross_layer import CrossLayer, check_cross_layer
from nanosae.train.finetune import check_finetune, finetune
from nanosae.train.init import init_sae
from nanosae.train.losses import (
    LossOutput,
    calibrate_threshold,
    normalize_decoder,
    remove_parallel_grad,
    sae_loss,
    sum_parts,
)
from nanosae.train.refit import MAX_TOKENS, READ_BATCH, DecoderRefit, codes, refit_applies
from nanosae.train.schedule import Schedule, ema_decay_at, k_at, lr_at
from nanosae.train.sharded import (
    check_shardable,
    clip_gradients,
    gather_full,
    load_shard,
    local_slice,
    make_shards,
    reduce_gradients,
    save_shard,
    shard_file,
    shard_names,
    sharded_loss,
)

log = logging.getLogger(__name__)


CALIBRATION_TOKENS = 8192  # BatchTopK's inference threshold is set on this many tokens after training


class TrainResult(NamedTuple):
    sae: SAE
    run_dir: Path
    steps: int
    tokens: int
    metrics: dict[str, float]


class TrainProgress(NamedTuple):
    step: int
    steps: int
    metrics: dict[str, float]


def make_adam(sae: SAE, lr: float, cfg: TrainConfig, decoder_lr_scale: float = 1.0) -> torch.optim.Adam:
    """Fused Adam (one pass over all parameters instead of a loop over tensors) where available. The decoder
    (W_dec, b_dec) is its own group, stepped at decoder_lr_scale × lr: at a few hundred steps the decoder lags
    the encoder (see train.refit), and a faster decoder lowered the CE-loss gap on every job measured."""
    decoder = [sae.W_dec, sae.b_dec]
    groups = [
        dict(params=[p for p in sae.parameters() if all(p is not q for q in decoder)], lr_scale=1.0),
        dict(params=decoder, lr_scale=decoder_lr_scale),
    ]
    kwargs: dict[str, Any] = dict(lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    try:
        return torch.optim.Adam(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, **kwargs)


class MetricSinks:
    """Optional tensorboard / wandb logging, imported only when asked for."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(
                project=os.environ.get("WANDB_PROJECT", "nanosae"),
                dir=str(run_dir),
                name=run_dir.name,
                config=dataclasses.asdict(cfg),
                resume="allow",
            )

    def log(self, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.tb.add_scalar(key, value, metrics["step"])
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---- distributed helpers ------------------------------------------------------------------------------
def dist_info() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group) under torchrun; (0, 1, False) alone."""
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), started
    return 0, 1, False


def end_process_group() -> None:
    """Wait for every process (rank 0 writes the SAE last), then shut the group down: a gloo group left alive
    at interpreter exit can abort the process ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(world)


# ---- data ---------------------------------------------------------------------------------------------
def batch_stream(
    source: ActivationStore | ActivationStream, cfg: TrainConfig, start_batch: int
) -> Generator[torch.Tensor, None, None]:
    """Endless batches (epochs as needed), counting every batch the source yields, partial ones included."""
    if isinstance(source, ActivationStore):
        epochs = math.ceil(cfg.optim.tokens / max(1, len(source))) + 1
        yield from source.batches(
            cfg.optim.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs, start_batch=start_batch
        )
        return
    skipped, epoch = 0, 0
    while True:  # a stream restarts its corpus with a new shuffle seed each epoch
        n = 0
        for batch in source.batches(cfg.optim.batch_size, shuffle=True, seed=cfg.seed + epoch):
            n += 1
            if skipped < start_batch:
                skipped += 1
                continue
            yield batch
        if n == 0:
            raise DataError("the training data gave no activations")
        epoch += 1


def first_tokens(source: ActivationStore | ActivationStream, n: int) -> torch.Tensor:
    if isinstance(source, ActivationStore):
        return source.tokens(0, min(n, len(source)))
    parts, got = [], 0
    for acts in source.activations():
        parts.append(acts.cpu())
        got += len(acts)
        if got >= n:
            break
    return torch.cat(parts)[:n]


def check_fits(d_in: int, d_sae: int, d_out: int, device: str, shards: int = 1) -> None:
    """Refuse, before allocating, an SAE whose weights, gradients and Adam state (16 bytes a weight) cannot fit
    in this machine's memory (or the GPU's)."""
    need = 16 * (d_in + d_out) * d_sae / max(1, shards)
    if torch.device(device).type == "cuda":
        have, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, "the GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    if need > have:
        raise ConfigError(
            f"d_sae {d_sae:,} at width {d_in} needs about {need / 2**30:,.0f} GiB for weights, gradients "
            f"and Adam state; {where} has {have / 2**30:,.0f} GiB"
        )


# ---- the loop -----------------------------------------------------------------------------------------
Placement = list[tuple[int, slice]]  # (source index, columns) of each block of a run's input or target


class SAERun:
    """One SAE being trained: its weights, optimizer, counters and files. Several can share one stream.

    Its input is the concatenation of `ins` (one block for an SAE, one per layer for a crosscoder); its target
    is `outs` (the same blocks, except for a transcoder).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        sources: list[Any],
        ins: Placement,
        outs: Placement,
        rank: int,
        world: int,
        sample: Callable[[int, int], torch.Tensor] | None = None,
        resume_steps: set[int] | None = None,
    ):
        """sample(i, n): the first n activations of source i (shared between runs so a stream is read once);
        resume_steps: the checkpoint steps it may resume from (those its stream-mates have too)."""
        self.cfg, self.ins, self.outs, self.rank, self.world = cfg, ins, outs, rank, world
        self.shards = None
        if cfg.shard_latents:
            if not dist.is_initialized():
                raise ConfigError(
                    "--shard-latents splits the latents over processes: start with torchrun --nproc_per_node N"
                )
            check_shardable(cfg)
            self.shards = make_shards(cfg.shard_latents, rank, world, cfg.sae.d_sae)
        # the part of each batch this process trains on: replicas of the latent shards split the batch
        self.data_rank, self.data_world = (self.shards.replica, self.shards.replicas) if self.shards else (rank, world)
        self.sample = sample or (lambda i, n: first_tokens(sources[i], n))
        self.source_list = sources
        self.transcoder = ins != outs
        self.run_dir = Path(cfg.out)
        self.files = RunDir(self.run_dir)
        width = lambda placement: sum(cols.stop - cols.start for _, cols in placement)
        d_in, d_out = width(ins), width(outs)
        self.d = Schedule.of(cfg, d_in)
        check_fits(d_in, cfg.sae.d_sae, d_out, cfg.device, cfg.shard_latents or 1)  # each process holds d_sae / N
        torch.manual_seed(cfg.seed)  # the same initial weights whether trained alone or with others
        self.gen = torch.Generator().manual_seed(cfg.seed)  # this run's own randomness (resampling)
        in_keys, out_keys = cfg.source.io()
        name = lambda i, key: sources[i].hook if isinstance(sources[i], ActivationStore) else key
        in_hooks = [name(i, key) for (i, _), key in zip(ins, in_keys)]
        out_hooks = [name(i, key) for (i, _), key in zip(outs, out_keys)]
        source = sources[ins[0][0]]
        # stores of one hook from different models (collect --model A --model B): a model-diffing crosscoder
        models = [block_model(sources[i], n, len(ins)) for n, (i, _) in enumerate(ins)]
        diffing = len(ins) > 1 and len(set(in_hooks)) < len(in_hooks) and len(set(models)) > 1
        sae_cfg = cfg.sae.sae_config(
            d_in=d_in,
            hook_name=in_hooks[0],
            d_out=d_out,
            hook_name_out=out_hooks[0] if self.transcoder else "",
            crosscoder_hooks=in_hooks if len(ins) > 1 else None,
            crosscoder_models=models if diffing else None,
            model_name=_model_name(cfg, source),
            context_size=_context_size(cfg, source),
            dataset_path=_dataset_path(cfg, source),
            device="cpu" if self.shards else cfg.device,
        )  # sharded: initialised whole, then sliced
        self.sae = SAE(sae_cfg)
        self.sae.train()
        self.since_fired = torch.zeros(cfg.sae.d_sae, dtype=torch.long)  # moves to the device of the counts it takes
        self.ema: dict[str, torch.Tensor] | None = None
        self.kl_coefficient: float | None = None  # set by the fine-tune's first step
        self.step, self.batches_done, self.seconds = 0, 0, 0.0
        self.last: dict[str, float] = {}
        self.unit_decoder = True  # decoder rows kept at unit norm (a cross-layer transcoder norms them jointly)
        self._started = 0.0
        stores = {i for i, _ in ins + outs if isinstance(sources[i], ActivationStore)}
        self.refits = refit_applies(cfg, stored=len(stores) == len({i for i, _ in ins + outs}))
        self.refit_done = False
        self.job = job_identity(cfg, [store_fingerprint(sources[i]) for i in sorted(stores)])
        if rank == 0:
            self._claim_run_dir()
        found = load_checkpoint(self.run_dir, resume_steps) if cfg.resume else None
        if found is None:
            self._start()
        if self.shards:
            self.sae = local_slice(self.sae, self.shards, cfg.device)
        self.opt = make_adam(self.sae, self.d.lr, cfg, self.d.decoder_lr_scale)
        if found is not None:
            self._resume(*found)
        elif cfg.optim.ema_decay:
            self.ema = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        _trim_metrics(self.files.metrics, self.step, rank)
        self.sinks = MetricSinks(cfg, self.run_dir) if rank == 0 else None

    def gather(
        self, batch: list[torch.Tensor] | dict[int, torch.Tensor], placement: Placement, rows: slice = slice(None)
    ) -> torch.Tensor:
        """One run's input or target from the sources' batches (blocks side by side)."""
        parts = [batch[i][rows, cols] for i, cols in placement]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _claim_run_dir(self) -> None:
        """A run directory holds one job: the same settings continue it (with --resume), others are refused."""
        run_dir, saved = self.run_dir, self.files.config
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file; expected a run directory")
        check_job_dir(run_dir, "training run", allow=("training run", "transcoder set"))
        for sub in (self.files.checkpoints, self.files.sae):
            if sub.exists() and not sub.is_dir():
                raise FormatError(f"{sub} is a file, not a directory; move it away, nothing was changed")
        if saved.exists():
            compare_jobs(saved_job(read_json(saved), saved), self.job, saved)
            if not self.cfg.resume:
                raise ConfigError(
                    f"{run_dir} already holds this run; pass --resume to continue it, or use another --out"
                )
        elif any(p.exists() for p in (self.files.sae, self.files.checkpoints, self.files.metrics)):
            raise ConfigError(f"{run_dir} holds SAE files but no config.json; use another --out, nothing was changed")

    def _resume(self, ckpt: Path, state: dict[str, Any], loaded: SAE | None) -> None:
        if state["step"] > self.d.steps:
            raise FormatError(f"{ckpt}: step {state['step']:,} is beyond this run's {self.d.steps:,} steps")
        compare_jobs(state.get("job") or saved_job(state.get("config") or {}, ckpt), self.job, ckpt)
        if self.shards:  # the job's settings match, so the slice's shapes do: its own file holds its state
            shard = load_shard(ckpt, self.shards)
            self.sae.cfg.activation_scale, self.sae.cfg.output_scale = state["scales"]
            self.sae.load_state_dict(shard["sae"])
            self.opt.load_state_dict(shard["optimizer"])
            self.ema = on_device(shard["ema"], self.cfg.device)
        else:
            self._load_whole(ckpt, state, loaded)
        self.step, self.batches_done, self.since_fired = state["step"], state["batches"], state["since_fired"]
        self.seconds = state["seconds"]
        self.kl_coefficient = state.get("kl_coefficient")
        self.refit_done = state.get("refit_done", False)
        self.gen.set_state(state["rng"])
        if ckpt != latest_checkpoint(self.run_dir):
            log.warning("resumed %s from %s, the newest readable checkpoint", self.run_dir, ckpt.name)
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def _load_whole(self, ckpt: Path, state: dict[str, Any], loaded: SAE | None) -> None:
        if loaded is None:
            raise FormatError(
                f"{ckpt}: a checkpoint of latents sharded over processes; resume it with the same "
                f"--shard-latents under torchrun"
            )
        fields = (
            "architecture",
            "d_in",
            "d_sae",
            "d_out",
            "k",
            "hook_name",
            "hook_name_out",
            "crosscoder_hooks",
            "crosscoder_models",
            "matryoshka_groups",
            "skip_connection",
            "normalize_activations",
        )
        for name in fields:
            if getattr(loaded.cfg, name) != getattr(self.sae.cfg, name):
                raise FormatError(
                    f"{ckpt}: the checkpoint's SAE has {name}={getattr(loaded.cfg, name)!r}; this run "
                    f"asks for {getattr(self.sae.cfg, name)!r}"
                )
        self.sae.cfg.activation_scale = loaded.cfg.activation_scale
        self.sae.cfg.output_scale = loaded.cfg.output_scale
        self.sae.load_state_dict(loaded.state_dict())
        self.opt.load_state_dict(state["optimizer"])
        self.ema = on_device(state.get("ema"), self.cfg.device)

    def _start(self) -> None:
        """A new run: the initialisation sample checked and the scales set first, then config.json written (a
        refused start leaves no run behind that would refuse the corrected command)."""
        n = self.cfg.optim.init_sample_tokens
        samples = {i: self.sample(i, n) for i, _ in self.ins + self.outs}
        x, y = self.gather(samples, self.ins), self.gather(samples, self.outs)
        where = ", ".join(
            dict.fromkeys(
                str(getattr(self.source_list[i], "path", "the model's activations")) for i, _ in self.ins + self.outs
            )
        )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise DataError(f"{where}: the training activations contain NaN or inf")
        if (
            self.cfg.optim.scale_activations and self.cfg.sae.normalize_activations == "none"
        ):  # mean squared norm -> width
            scale = lambda placement: [norm_scale(samples[i][:, c], where) for i, c in placement]
            in_scales = scale(self.ins)
            self.sae.cfg.activation_scale = in_scales if len(in_scales) > 1 else in_scales[0]
            if self.transcoder:
                self.sae.cfg.output_scale = scale(self.outs)[0]
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.files.config, dataclasses.asdict(self.cfg) | {"sources": self.job["sources"]})
            self.files.metrics.unlink(missing_ok=True)
        x_norm = self.sae.normalize_input(x)[0]
        init_sae(
            self.sae,
            x_norm,
            self.cfg.optim.init_b_dec,
            target=y * self.sae.output_factor() if self.transcoder else None,
            encoder_scale=self.cfg.optim.init_encoder_scale,
        )

    @property
    def done(self) -> bool:
        return self.step >= self.d.steps

    @property
    def stored_done(self) -> bool:
        """Done with the steps read from the activations (the rest is the end-to-end fine-tune)."""
        return self.step >= self.d.steps - self.d.kl_steps

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; with sharded latents every slice first writes its own file, which rank 0
        moves into the step's directory (so a checkpoint directory is whole or absent)."""
        state = {
            "step": self.step,
            "batches": self.batches_done,
            "since_fired": self.since_fired.cpu(),
            "rng": self.gen.get_state(),
            "seconds": self.seconds,
            "kl_coefficient": self.kl_coefficient,
            "config": dataclasses.asdict(self.cfg),
            "job": self.job,
            "refit_done": self.refit_done,
        }
        if self.shards is None:
            if self.rank == 0:
                save_checkpoint(
                    self.run_dir, self.step, self.sae, state | {"optimizer": self.opt.state_dict(), "ema": self.ema}
                )
            return
        root = self.files.checkpoints
        save_shard(
            root,
            self.step,
            self.shards,
            {"sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "ema": self.ema},
        )
        dist.barrier()
        if self.rank == 0:
            cfg, n = self.sae.cfg, self.shards.n
            moved = {name: shard_file(root, self.step, i, n) for i, name in enumerate(shard_names(n))}
            save_checkpoint(
                self.run_dir,
                self.step,
                None,
                state | {"scales": (cfg.activation_scale, cfg.output_scale), "shards": self.shards.n},
                moved,
            )

    def train_step(self, batch: list[torch.Tensor]) -> dict[str, float] | None:
        """One optimizer step on this process's slice of the global batch (one tensor per source)."""
        local = self.cfg.optim.batch_size // self.data_world
        rows = slice(self.data_rank * local, (self.data_rank + 1) * local)
        x = self.gather(batch, self.ins, rows).to(self.cfg.device)
        y = self.gather(batch, self.outs, rows).to(self.cfg.device) if self.transcoder else None
        return self.step_on(x, y)

    def step_on(
        self, x: torch.Tensor, y: torch.Tensor | None, extra: Callable[[Any], dict[str, torch.Tensor]] | None = None
    ) -> dict[str, float] | None:
        """One optimizer step on inputs x (targets y for a transcoder); extra(loss output) adds loss terms
        (the end-to-end fine-tune's KL). Returns the metrics when they are logged."""
        out = self.loss_on(x, y, extra)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        return self.apply_step(out, x, y)

    def loss_on(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        extra: Callable[[Any], dict[str, torch.Tensor]] | None = None,
        added: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of one step (added: a prediction from elsewhere, see sae_loss); apply_step, after the
        backward pass, takes the step. Split so that coupled SAEs (a cross-layer transcoder) share one backward."""
        cfg, d, sae = self.cfg, self.d, self.sae
        self._started = time.perf_counter()
        lr = lr_at(self.step, cfg, d)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        coeff = d.sparsity * min(1.0, (self.step + 1) / max(1, d.sparsity_warmup))
        # the tokens read so far bound since_fired: no latent can be dead before dead_tokens (and no device sync)
        could_be_dead = self.batches_done * cfg.optim.batch_size >= d.dead_tokens
        dead = (self.since_fired >= d.dead_tokens).to(sae.device) if could_be_dead else None
        k = k_at(self.step, cfg, d)  # k annealing
        if self.shards:
            out = sharded_loss(
                sae,
                x,
                y,
                self.shards,
                k=k,
                dead_mask=dead,
                k_aux=d.k_aux,
                aux_coefficient=cfg.optim.aux_coefficient,
                norm_weighting=cfg.optim.norm_weighting,
                encoder_bf16=cfg.optim.encoder_bf16,
            )
        else:
            out = sae_loss(
                sae,
                x,
                y,
                k=k,
                sparsity_coefficient=coeff,
                k_aux=d.k_aux,
                aux_coefficient=cfg.optim.aux_coefficient,
                norm_weighting=cfg.optim.norm_weighting,
                dead_mask=dead if sae.arch.dead_latents == "auxk" else None,
                encoder_bf16=cfg.optim.encoder_bf16,
                added=added,
            )
        if extra is not None:
            extra_parts = extra(out)
            out = out._replace(loss=out.loss + sum_parts(extra_parts), parts=out.parts | extra_parts)
        if not torch.isfinite(out.loss):  # the step's one wait for the device; bad input shows here first
            if not torch.isfinite(x).all() or (y is not None and not torch.isfinite(y).all()):
                raise DataError(
                    f"NaN or inf in the training activations at step {self.step}; "
                    f"last good checkpoint: {latest_checkpoint(self.run_dir) or 'none'}"
                )
            raise TrainingError(
                f"{self.run_dir}: loss became {float(out.loss)} at step {self.step} (try a lower --lr); "
                f"last good checkpoint: {latest_checkpoint(self.run_dir) or 'none'}"
            )
        return out

    def apply_step(self, out: LossOutput, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float] | None:
        """The optimizer step once out.loss's gradients are in; the metrics when they are logged."""
        cfg, d, sae, opt = self.cfg, self.d, self.sae, self.opt
        lr = opt.param_groups[0]["lr"]
        fired = out.fired.float()
        if self.shards:
            reduce_gradients(sae, self.shards, fired)
        else:
            all_reduce_mean([p.grad for p in sae.parameters() if p.grad is not None] + [fired], self.world)
        if self.unit_decoder:
            remove_parallel_grad(sae)
        if cfg.optim.grad_clip and self.shards:
            clip_gradients(sae, self.shards, cfg.optim.grad_clip)
        elif cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.optim.grad_clip)
        opt.step()
        if self.unit_decoder:
            normalize_decoder(sae)
        if sae.arch.after_step is not None:
            sae.arch.after_step(sae)
        self.since_fired = self.since_fired.to(fired.device).add_(len(x) * self.data_world).masked_fill_(fired > 0, 0)
        # resampled latents fire on many tokens for a few steps: never in the second half, so the run ends settled
        if (
            sae.arch.dead_latents == "resample"
            and (self.step + 1) % d.resample_every == 0
            and self.step + 1 <= d.steps // 2
        ):
            resample_dead(sae, opt, x, (self.since_fired >= d.dead_tokens).to(sae.device), self.gen, target=y)
        if self.ema is not None and cfg.optim.ema_decay is not None:
            decay = ema_decay_at(self.step, cfg.optim.ema_decay)
            with torch.no_grad():
                for k, v in sae.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].mul_(decay).add_(v, alpha=1 - decay)
                    else:
                        self.ema[k].copy_(v)
        self.seconds += time.perf_counter() - self._started
        self.step += 1
        if self.step % cfg.log_every and self.step != d.steps:
            return None
        self.last = _metrics(self.step, cfg, out, lr, self.since_fired, d, self.seconds, self.world)
        if self.sinks is not None:  # rank 0
            with open(self.files.metrics, "a") as f:
                f.write(json.dumps(self.last) + "\n")
            self.sinks.log(self.last)
        return self.last

    def after_step(self, metrics: dict[str, float] | None, progress: Callable[[TrainProgress], None] | None) -> None:
        """Report a logged step's metrics and write a checkpoint when one is due (not at the end: finish does)."""
        if metrics is not None and progress is not None:
            progress(TrainProgress(self.step, self.d.steps, metrics))
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and not self.done:
            self.checkpoint()

    @torch.no_grad()
    def refit_decoder(self, batches: Iterable[list[torch.Tensor]]) -> None:
        """The least-squares decoder for the final codes of the stored batches (train.refit); this process
        reads its slice of each batch, as in training. Leaves the SAE in eval mode (its inference codes)."""
        sae = self.sae.eval()
        refit = DecoderRefit(sae.cfg.d_sae, sae.cfg.d_out, sae.device)
        for batch in batches:
            local = math.ceil(len(batch[0]) / self.data_world)
            rows = slice(self.data_rank * local, (self.data_rank + 1) * local)
            x = self.gather(batch, self.ins, rows).to(self.cfg.device)
            y = (
                sae.normalize_target(self.gather(batch, self.outs, rows).to(self.cfg.device))
                if self.transcoder
                else sae.normalize_input(x)[0]
            )
            refit.add(*codes(sae, x), y)
        all_reduce_mean([refit.gram, refit.cross], self.world)
        self.last["refit_latents"] = refit.apply(sae)

    def finish(
        self,
        calibration: list[list[torch.Tensor]] | None = None,
        stored: Callable[[], Iterable[list[torch.Tensor]]] | None = None,
    ) -> TrainResult:
        """Final weights (the EMA when kept); BatchTopK's threshold calibrated on the calibration batches; the
        decoder refit on the stored batches. The last checkpoint holds the training state from before these
        steps, so a finished run that is resumed derives them again and ends with the same weights."""
        self.checkpoint()
        if self.ema is not None:
            self.sae.load_state_dict(self.ema)
        if calibration and self.sae.arch.selection == "batch":
            x = torch.cat([self.gather(b, self.ins) for b in calibration]).to(self.cfg.device)
            self.last["threshold"] = calibrate_threshold(self.sae, x)
        if self.refits and stored is not None and not self.refit_done:
            self.refit_decoder(stored())
            self.refit_done = True
        self.sae.eval()
        whole = gather_full(self.sae, self.shards, self.cfg.sae.d_sae) if self.shards else self.sae
        if self.rank == 0:
            save_sae(whole, self.files.sae)
        return TrainResult(whole, self.run_dir, self.step, self.step * self.cfg.optim.batch_size, self.last)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def block_model(source: Any, n: int, blocks: int) -> str:
    """The model a run's n-th input block is read from: a store's own, or a streamed pair's (A's blocks, then B's)."""
    if isinstance(source, ActivationStore):
        return str(source.manifest.get("model", ""))
    models = getattr(source, "models", None) or []
    return models[n * len(models) // blocks].name if models else ""


def open_sources(cfgs: list[TrainConfig]) -> tuple[list[Any], list[tuple[Placement, Placement]]]:
    """The sources the runs read, and for each run where its input and target blocks sit.

    Stores: one per distinct store path (stores of several hooks must come from one collection, so their
    shuffled batches line up). Streaming: one forward pass captures every hook, side by side in columns.
    """
    io = [c.source.io() for c in cfgs]
    keys = list(dict.fromkeys(k for ins, outs in io for k in ins + outs))
    from_stores = [c.source.from_stores for c in cfgs]
    if all(from_stores):
        stores = [ActivationStore(p) for p in keys]
        for store in stores:
            if len(store) == 0:
                raise DataError(f"{store.path}: the store holds no activations (its manifest lists no shards)")
        if len({len(s) for s in stores}) > 1:
            raise DataError("stores trained together must come from one collection (they differ in token count)")
        check_same_tokens([s for s in stores if s.manifest.get("model") != stores[0].manifest.get("model")], stores[0])
        place = lambda key: (keys.index(key), slice(0, stores[keys.index(key)].d_in))
        return stores, [([place(k) for k in ins], [place(k) for k in outs]) for ins, outs in io]
    if any(from_stores):
        raise ConfigError("train either all SAEs from stores (--acts) or all from the model, not a mix")
    from nanosae.models import load_model

    first = cfgs[0]
    if any(
        (c.source.model, c.source.data, c.source.model_batch_size)
        != (first.source.model, first.source.data, first.source.model_batch_size)
        for c in cfgs
    ):
        raise ConfigError("SAEs streamed together must use the same model, data and model batch size")
    if any(c.source.versus != first.source.versus for c in cfgs):
        raise ConfigError("SAEs streamed together must diff the same pair of models (--versus)")
    # the mixing buffer: big enough to mix documents, small enough not to read far ahead of a short run
    buffer = min(65536, max(4 * first.optim.batch_size, first.optim.tokens // 8))
    load = lambda spec: load_model(spec, device=first.device, dtype=model_dtype(first.source.model_dtype, first.device))
    host = load(first.source.model)
    versus = load(first.source.versus) if first.source.versus else None
    if versus is not None:
        check_pair(host, versus, keys, (first.source.model, str(first.source.versus)))
    stream = ActivationStream(
        host,
        keys,
        first.source.data,
        model_batch_size=first.source.model_batch_size,
        buffer_tokens=buffer,
        versus=versus,
    )
    if versus is not None:  # A's columns, then B's: a crosscoder over one hook of the two models
        width = host.hook_dim(keys[0])
        pair = [(0, slice(0, width)), (0, slice(width, 2 * width))]
        return [stream], [(pair, pair) for _ in cfgs]
    place = lambda hook: (0, stream.columns(hook))
    return [stream], [([place(h) for h in ins], [place(h) for h in outs]) for ins, outs in io]


@overload
def train(
    cfg: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    source: ActivationStore | ActivationStream | None = None,
) -> TrainResult: ...


@overload
def train(
    cfg: list[TrainConfig],
    progress: Callable[[TrainProgress], None] | None = None,
    source: ActivationStore | ActivationStream | None = None,
) -> list[TrainResult]: ...


def train(
    cfg: TrainConfig | list[TrainConfig],
    progress: Callable[[TrainProgress], None] | None = None,
    source: ActivationStore | ActivationStream | None = None,
) -> TrainResult | list[TrainResult]:
    """Train one SAE into cfg.out, or several from one stream (one read of the stores / one forward pass).

    Several configs must share batch_size and tokens; the data order follows the first config's seed.
    """
    single = isinstance(cfg, TrainConfig)
    cfgs: list[TrainConfig] = [cfg] if isinstance(cfg, TrainConfig) else list(cfg)
    rank, world, started_group = dist_info()
    first = cfgs[0]
    if any((c.optim.batch_size, c.optim.tokens) != (first.optim.batch_size, first.optim.tokens) for c in cfgs):
        raise ConfigError("SAEs trained from one stream must share batch_size and tokens")
    spread = owners(cfgs, world) if first.distribute_saes else None
    if first.sae.cross_layer:
        check_cross_layer(cfgs, world)
    if spread is None and first.optim.batch_size % world:
        raise ConfigError(f"batch_size {first.optim.batch_size} is not divisible by {world} processes")
    if len({str(Path(c.out).resolve()) for c in cfgs}) < len(cfgs):
        raise ConfigError("SAEs trained together need one run directory each (their --out values repeat)")
    with contextlib.ExitStack() as locks:  # one writer per run directory (its owner, or rank 0 for every process)
        for i, c in enumerate(cfgs):
            if (spread[i] if spread else 0) == rank:
                locks.enter_context(write_lock(c.out))
        results = _train_locked(cfgs, progress, source, rank, world, spread)
    if started_group:  # only on success: shutting down while another process is mid-collective would hang
        end_process_group()
    return results[0] if single else results


def owners(cfgs: list[TrainConfig], world: int) -> list[int]:
    """distribute_saes: the rank that trains each SAE (round robin; every rank reads every batch whole)."""
    if any(c.distribute_saes != cfgs[0].distribute_saes for c in cfgs):
        raise ConfigError("SAEs trained together either all spread over the processes (distribute_saes) or none")
    if any(c.shard_latents for c in cfgs):
        raise ConfigError(
            "distribute_saes spreads whole SAEs over the processes; it cannot be combined with shard_latents"
        )
    if len(cfgs) < world:
        raise ConfigError(f"distribute_saes needs at least one SAE per process ({len(cfgs)} SAEs, {world} processes)")
    return [i % world for i in range(len(cfgs))]


def _train_locked(
    cfgs: list[TrainConfig],
    progress: Callable[[TrainProgress], None] | None,
    source: ActivationStore | ActivationStream | None,
    rank: int,
    world: int,
    spread: list[int] | None = None,
) -> list[TrainResult]:
    """Train the runs; with spread (the owner rank of each config), this rank trains only its own, as a single
    process would, and the others' results are read from their run directories at the end."""
    first = cfgs[0]
    if source is not None:
        whole = [(0, slice(0, source.d_in))]
        sources, placement = [source], [(whole, whole)] * len(cfgs)
    else:
        sources, placement = open_sources(cfgs)
    stores = [s for s in sources if isinstance(s, ActivationStore)]
    if stores and first.optim.batch_size * world > len(stores[0]):  # before any run directory is written
        raise ConfigError(
            f"--batch-size {first.optim.batch_size}{f' x {world} processes' if world > 1 else ''} is "
            f"more than the {len(stores[0]):,} tokens {stores[0].path} holds; use a batch of at most "
            f"{len(stores[0]) // world:,}"
        )
    # the initialisation sample of each source is read once (a prefix of the largest one any run asks for)
    largest = max(c.optim.init_sample_tokens for c in cfgs)
    cached: dict[int, torch.Tensor] = {}

    def sample(i: int, n: int) -> torch.Tensor:
        if i not in cached:
            cached[i] = first_tokens(sources[i], largest)
        return cached[i][:n]

    mine = [i for i in range(len(cfgs)) if spread is None or spread[i] == rank]
    as_rank, as_world = (0, 1) if spread else (rank, world)
    if spread:
        log.info("process %d trains %s", rank, ", ".join(cfgs[i].out for i in mine))
    # runs sharing this process's stream resume from a step every one of them (and the cross-layer decoders) has
    steps = None
    if first.resume and (len(mine) > 1 or first.sae.cross_layer):
        steps = common_steps(
            [Path(cfgs[i].out) for i in mine]
            + ([Path(first.out).parent / "cross_layer"] if first.sae.cross_layer else [])
        )
    runs = [SAERun(cfgs[i], sources, *placement[i], as_rank, as_world, sample, resume_steps=steps) for i in mine]
    start = {r.batches_done for r in runs}
    if spread and world > 1:  # every rank reads the same batches: their checkpoints must agree across ranks
        ends = torch.tensor([min(start), -max(start)])
        dist.all_reduce(ends, op=dist.ReduceOp.MIN)
        start |= {int(ends[0]), -int(ends[1])}
    if len(start) > 1:
        raise TrainingError("the runs' checkpoints are at different data positions; resume them separately")
    batches_done = start.pop()
    check_finetune(runs, world)
    coupled = None
    if first.sae.cross_layer:
        coupled = CrossLayer(runs, Path(first.out).parent, steps)
    streams = [batch_stream(s, first, batches_done) for s in sources]
    try:
        while not all(r.stored_done for r in runs):
            batch = [next(s) for s in streams]
            batches_done += 1
            short = len(batch[0]) < first.optim.batch_size  # an epoch's short tail: skipped, but counted for resume
            for r in runs:
                if short or coupled is not None or r.stored_done:
                    r.batches_done = batches_done
            if short:
                continue
            if coupled is not None:  # the layers of a cross-layer transcoder: one joint step
                for r, metrics in zip(runs, coupled.train_step(batch)):
                    r.after_step(metrics, progress)
                coupled.after_step()
                continue
            for r in runs:
                if r.stored_done:
                    continue
                r.batches_done = batches_done  # only now: a Ctrl-C before its step checkpoints its true position
                r.after_step(r.train_step(batch), progress)
        calibration = None  # BatchTopK thresholds: set on batches the runs did not train on, after training
        if any(r.cfg.sae.arch.selection == "batch" for r in runs):
            # as many as the data has left (a small store read for several epochs may have fewer)
            wanted = math.ceil(CALIBRATION_TOKENS / first.optim.batch_size)
            calibration = [list(b) for b in itertools.islice(zip(*streams), wanted)] or None
        for s in streams:
            s.close()
        for r in runs:  # the end-to-end fine-tune, when asked for: the last steps run through the model
            finetune(r, sources[r.ins[0][0]], progress)
    except KeyboardInterrupt:
        for r in runs:
            r.checkpoint()
        if coupled is not None:
            coupled.checkpoint()
        raise
    finally:
        for r in runs:
            r.close()

    def stored_batches() -> Iterator[list[torch.Tensor]]:  # the refit's pass: the first n tokens of every store
        n = min(len(stores[0]), first.optim.tokens, MAX_TOKENS)
        for i, batch in enumerate(zip(*[s.batches(READ_BATCH, shuffle=False) for s in stores])):
            if i * READ_BATCH >= n:
                return
            yield [b[: n - i * READ_BATCH] for b in batch]

    finished = dict(zip(mine, [r.finish(calibration, stored_batches) for r in runs]))
    if coupled is not None:
        coupled.finish()
    if spread and world > 1:
        dist.barrier()  # every owner has saved its SAEs
    return [finished.get(i) or saved_result(cfgs[i]) for i in range(len(cfgs))]


def on_device(tensors: dict[str, torch.Tensor] | None, device: str) -> dict[str, torch.Tensor] | None:
    """A state dict read from a checkpoint (on the CPU) moved to where the SAE trains."""
    return None if tensors is None else {k: v.to(device) for k, v in tensors.items()}


def saved_result(cfg: TrainConfig) -> TrainResult:
    """A finished run read back from its directory (an SAE another process trained)."""
    files = RunDir(Path(cfg.out))
    lines = files.metrics.read_text().splitlines() if files.metrics.exists() else []
    last = parse_json(lines[-1], files.metrics) if lines else {}
    steps = cfg.optim.tokens // cfg.optim.batch_size
    return TrainResult(SAE.load(files.sae), Path(cfg.out), steps, steps * cfg.optim.batch_size, last)


def _metrics(
    step: int, cfg: TrainConfig, out: Any, lr: float, since_fired: torch.Tensor, d: Schedule, seconds: float, world: int
) -> dict[str, float]:
    x, x_hat = out.x, out.x_hat
    stats = torch.stack([(x - x_hat).pow(2).sum(), (x - x.mean(0)).pow(2).sum(), out.fired.sum().float() / len(x)])
    all_reduce_mean([stats], world)
    metrics = {"step": step, "tokens": step * cfg.optim.batch_size, "loss": float(out.loss.detach())}
    metrics |= {k: float(v.detach()) for k, v in out.parts.items()}
    metrics |= {
        "l0": float(stats[2]),
        "fvu": float(stats[0] / stats[1].clamp_min(1e-12)),
        "dead_fraction": float((since_fired >= d.dead_tokens).float().mean()),
        "lr": lr,
        "tokens_per_s": step * cfg.optim.batch_size / max(seconds, 1e-9),
    }
    return metrics


def _trim_metrics(path: Path, step: int, rank: int) -> None:
    """On resume, drop logged lines from after the checkpoint so the log has each step once."""
    if rank or not path.exists():
        return
    kept = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            logged = parse_json(line, f"{path}:{n}") if line else None
        except FormatError:  # a line cut short when the run was killed: dropped, said once
            log.warning("%s:%d is not a JSON line (cut short by a kill?); dropped", path, n)
            continue
        if isinstance(logged, dict) and isinstance(logged.get("step"), int) and logged["step"] <= step:
            kept.append(line)
    write_json_lines(path, kept)


def write_json_lines(path: Path, lines: list[str]) -> None:
    from nanosae.io import atomic_write

    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in lines)))


@torch.no_grad()
def resample_dead(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    dead: torch.Tensor,
    gen: torch.Generator | None = None,
    target: torch.Tensor | None = None,
) -> int:
    """Anthropic-style resampling for ReLU SAEs: dead latents restart on inputs the SAE reconstructs worst.

    Inputs are drawn with probability proportional to their squared error; the decoder row becomes the
    (centred) target's direction, the encoder column the (centred) input's direction scaled to 0.2 × the
    mean alive encoder norm, b_enc 0, and their Adam moments are reset. (target: a transcoder's output.)
    """
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return 0
    x_norm, _ = sae.normalize_input(x)
    y = x_norm if target is None else sae.normalize_target(target)
    y_hat = sae.normalize_target(sae.reconstruct_clean(x))
    err = (y - y_hat).pow(2).sum(-1)
    if float(err.sum()) <= 0:
        return 0
    picks = torch.multinomial((err / err.sum()).cpu(), len(idx), replacement=True, generator=gen).to(err.device)
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
    dec_dirs = unit(y[picks] - sae.b_dec)
    enc_dirs = unit(x_norm[picks] - sae.b_dec) if sae.cfg.apply_b_dec_to_input else unit(x_norm[picks])
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = dec_dirs
    sae.W_enc[:, idx] = enc_dirs.T * 0.2 * enc_norm
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][sl] = 0.0
    return len(idx)


def _model_name(cfg: TrainConfig, source: Any) -> str:
    if isinstance(source, ActivationStore):
        return source.manifest["model"]
    return source.model.name if hasattr(source, "model") else cfg.source.model


def _dataset_path(cfg: TrainConfig, source: Any) -> str:
    """Every corpus the activations came from (a store records its collection's), comma-separated as
    SAELens's dataset_path; the store's own path when it does not record any."""
    if isinstance(source, ActivationStore):
        specs = (source.manifest.get("data") or {}).get("specs") or [str(source.path)]
    else:
        specs = cfg.source.data.specs
    return ",".join(map(str, specs))


def _context_size(cfg: TrainConfig, source: Any) -> int:
    return source.manifest["context_size"] if isinstance(source, ActivationStore) else cfg.source.data.context_size
