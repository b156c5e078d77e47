"""End-to-end fine-tune: the last part of a run trained on what the model does with the SAE spliced in.

An SAE trained on MSE alone spends capacity on directions the rest of the model ignores and misses some it
relies on. Training the last few percent of the tokens on KL(clean ‖ spliced) + MSE, through the later blocks,
closes much of the CE-loss gap at a small cost (Braun et al. 2024, end-to-end SAEs; Karvonen 2025, "a short
fine-tune is all you need"). Each step runs a few token windows once clean (logits, the hook's activations,
the outputs of the blocks before the hook recorded) and once with the SAE's reconstruction spliced in at the
hook's kept positions; only the blocks from the hook on are recomputed, and the gradient flows through them
into the SAE (the model's weights are frozen).

  loss = mse (+ AuxK) + λ · mean over kept predictions of KL(clean ‖ spliced)
  λ: --kl-coefficient, or set at the phase's first step so that λ·KL equals --kl-balance × the MSE there, then fixed

The windows come from the store's own corpus (its manifest records the collection's data settings and model)
or from the streamed corpus, read from the start; the activations are recomputed, so the SAE sees exactly
what the model computes at its hook.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Generator
from typing import TYPE_CHECKING, NamedTuple

import torch.nn.functional as F
from torch import Tensor

from nanosae.config import DataConfig
from nanosae.data import ActivationStore
from nanosae.data.corpus import iter_documents
from nanosae.data.tokens import TokenBatch, in_background, token_batches
from nanosae.errors import ConfigError
from nanosae.eval.metrics import replace_kept
from nanosae.models import HostModel, load_model

if TYPE_CHECKING:
    from nanosae.train.trainer import SAERun


def check_finetune(runs: list[SAERun], world: int) -> None:
    """The fine-tune trains one plain SAE in one process: refuse the rest in one line."""
    if not any(r.d.kl_steps for r in runs):
        return
    if len(runs) > 1:
        raise ConfigError("kl_finetune trains one SAE at a time (this run trains several from one stream)")
    if world > 1:
        raise ConfigError("kl_finetune runs in one process (torchrun with several processes is not supported)")
    if runs[0].sae.cfg.kind != "sae":
        raise ConfigError(f"kl_finetune is for SAEs at one hook, not a {runs[0].sae.cfg.kind}")


def model_and_data(run: SAERun, source) -> tuple[HostModel, DataConfig]:
    """The host model and corpus the run's activations came from."""
    if isinstance(source, ActivationStore):
        manifest = source.manifest
        if not manifest.get("data") or not manifest.get("model"):
            raise ConfigError(f"{source.path}: the store does not record its model and corpus, which kl_finetune needs")
        return load_model(manifest["model"], device=run.cfg.device), DataConfig.from_dict(manifest["data"])
    return source.model, source.data


def windows(model: HostModel, data: DataConfig, rows: int) -> Generator[TokenBatch, None, None]:
    """Endless batches of `rows` token windows from the corpus (it restarts when it ends)."""
    while True:
        batches = in_background(
            token_batches(iter_documents(data), model.tokenizer, data.context_size, rows, data.pack, data.exclude_first)
        )
        n = 0
        try:
            for batch in batches:
                n += 1
                yield batch
        finally:
            batches.close()
        if n == 0:
            return


def kl_divergence(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(clean) ‖ softmax(logits)), in float32."""
    clean = F.log_softmax(clean_logits.float(), dim=-1)
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), clean, log_target=True, reduction="sum") / max(
        1, len(logits)
    )


def finetune(run: SAERun, source, progress=None) -> None:
    """Train the run's remaining steps (its last kl_steps) on KL + MSE through the model."""
    if run.done:
        return
    model, data = model_and_data(run, source)
    for p in model.module.parameters():  # the model is frozen: gradients flow through it, not into it
        p.requires_grad_(False)
    hook = run.sae.cfg.hook_name
    model.parse_hook(hook)  # a clear error when the store's hook is not this model's
    rows = max(1, math.ceil(run.cfg.optim.batch_size / (data.context_size - 1)))
    stream = windows(model, data, rows)
    done_in_phase = run.step - (run.d.steps - run.d.kl_steps)
    try:
        for batch in itertools.islice(stream, done_in_phase, None):  # resumed inside the phase: skip what was used
            _step(run, model, hook, batch, progress)
            if run.done:
                break
    finally:
        stream.close()


class Clean(NamedTuple):
    logits: Tensor
    acts: Tensor  # at the hook
    blocks: list  # outputs of the blocks before the hook, replayed by the spliced pass


def clean_pass(model: HostModel, hook: str, tokens: Tensor) -> Clean:
    with model.recording_blocks(model.unchanged_blocks([hook])) as blocks:
        logits, cache = model.run_with_cache(tokens, [hook])
    return Clean(logits, cache[hook], blocks)


def spliced_kl(sae, model: HostModel, hook: str, tokens: Tensor, valid: Tensor, clean: Clean) -> Tensor:
    """Mean KL(clean ‖ spliced) over kept predictions, differentiable in the SAE's weights: the SAE's
    reconstruction replaces the kept positions' activations, the blocks after the hook are recomputed."""
    keep = valid[:, :-1] & valid[:, 1:]  # predictions made at a kept position of a kept token
    x_hat, _ = sae(clean.acts[valid].float())
    spliced = replace_kept(clean.acts, valid, x_hat)
    with model.replaying_blocks(clean.blocks), model.hooks({hook: lambda _: spliced}):
        logits = model.logits(tokens)
    return kl_divergence(clean.logits[:, :-1][keep], logits[:, :-1][keep])


def _step(run: SAERun, model: HostModel, hook: str, batch: TokenBatch, progress) -> None:
    tokens, valid = batch.tokens.to(model.device), batch.valid.to(model.device)
    if not (valid[:, :-1] & valid[:, 1:]).any():
        return
    clean = clean_pass(model, hook, tokens)

    def kl_term(out) -> dict[str, Tensor]:
        kl = spliced_kl(run.sae, model, hook, tokens, valid, clean)
        if run.kl_coefficient is None:  # balance the two terms once, at the phase's first step
            run.kl_coefficient = run.cfg.optim.kl_coefficient
            if run.kl_coefficient is None:
                balance = run.cfg.optim.kl_balance
                run.kl_coefficient = balance * float(out.parts["mse"].detach()) / max(float(kl.detach()), 1e-12)
        return {"kl": run.kl_coefficient * kl}

    run.after_step(run.step_on(clean.acts[valid].float(), None, extra=kl_term), progress)
