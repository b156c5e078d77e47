"""Circuits: attribution graphs over per-layer or cross-layer transcoders (Ameisen et al. 2025, "Circuit Tracing"), on
one machine.

The replacement model runs the host model with every MLP's output replaced by its transcoder's output plus an
error node (what the transcoder misses on this prompt), so its logits equal the model's. Freezing the attention
patterns and the norms' scales at their values on the prompt makes it linear in its sources: the input
embeddings, the error nodes and the active features' activations. The direct effect of source s on target t is
a_s · ∂t/∂a_s in that frozen model, where t is a feature's pre-activation or an output logit (minus the mean
logit); paths through other features are cut because features are inputs of the frozen model, not computed in it.

Rows of the adjacency matrix are targets, columns sources, both in the order [features, error nodes (layer-major),
input tokens, logits]. Rows are computed in batches (FrozenPass): the frozen model runs forward once over one copy
of the prompt per target in a batch, and each batch is then one backward pass, target b's gradient seeded in copy b.
For the Llama family that backward is written out instead (LinearPass): the same rows, without the work on
copies, positions and layers that a target does not depend on.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nanosae.config import EDGE_THRESHOLD, NODE_THRESHOLD
from nanosae.errors import ConfigError, FormatError
from nanosae.io import read_json
from nanosae.models.host import HostModel, StopForward
from nanosae.rundir import TranscoderSetDir
from nanosae.sae import SAE


def mlp_hooks(layer: int) -> tuple[str, str]:
    """Where a per-layer transcoder reads and writes: the MLP's (normed) input and its output."""
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


# ---- a set of transcoders: one per layer, or cross-layer ----------------------------------------------------
@dataclass
class TranscoderSet:
    """Each layer's transcoder (encoder, own decoder, skip) and, for a cross-layer transcoder, each layer's
    decoders to the later layers of the set: later[L] (d_sae, n_later, d_model) in the later layers' normalised
    output units. Layer j's MLP is replaced by Σ_{i<=j} z_i·W_dec(i->j) + b_dec_j (+ skip)."""

    by_layer: dict[int, SAE]
    later: dict[int, Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    @property
    def cross_layer(self) -> bool:
        return bool(self.later)

    def __getitem__(self, layer: int) -> SAE:
        return self.by_layer[layer]

    def __contains__(self, layer: int) -> bool:
        return layer in self.by_layer

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.by_layer)

    def hooks(self, layer: int) -> tuple[str, str]:
        """Where `layer`'s transcoder reads (the MLP's normed input, or for some foreign sets the residual stream
        before that norm) and writes (the MLP's output)."""
        cfg = self.by_layer[layer].cfg
        return cfg.hook_name, cfg.hook_name_out

    def items(self) -> list[tuple[int, SAE]]:
        return [(layer, self.by_layer[layer]) for layer in self.layers]

    def writers(self, target: int) -> list[int]:
        """The layers whose features write to `target`'s MLP output (itself, and earlier ones if cross-layer)."""
        return [i for i in self.layers if i == target or (i < target and i in self.later)]

    def targets(self, layer: int) -> list[int]:
        """The MLP outputs `layer`'s features write to."""
        return [j for j in self.layers if layer in self.writers(j)]

    def rows(self, source: int, target: int, latents: Tensor | None = None) -> Tensor:
        """The decoder rows of `source`'s features (all, or those latents) into `target`'s MLP output, in the
        model's units."""
        tc = self.by_layer[target]
        rows: Tensor
        if source == target:
            rows = tc.W_dec
        else:
            rows = self.later[source][:, self.layers.index(target) - self.layers.index(source) - 1]
        return (rows if latents is None else rows[latents]) / tc.output_factor()

    def rows_to_targets(self, source: int, latents: Tensor) -> Tensor:
        """Those latents' decoder rows into every MLP output they write to, (n, len(targets(source)), d_model),
        in the model's units."""
        return torch.stack([self.rows(source, target, latents) for target in self.targets(source)], 1)

    def decode(self, target: int, latents: dict[int, Tensor]) -> Tensor:
        """What the features write to `target`'s MLP output (b_dec included, the skip term not)."""
        out = self.by_layer[target].decode(latents[target])
        for i in self.writers(target):
            if i != target:
                out = out + (latents[i] @ self.rows(i, target)).to(out.dtype)
        return out

    def output(self, target: int, latents: dict[int, Tensor], x: Tensor) -> Tensor:
        """The replacement of `target`'s MLP output, given the latents of every layer up to it and its MLP input x."""
        return self.decode(target, latents) + skip_term(self.by_layer[target], x)


def load_transcoders(run: str | Path, device: str = "cpu") -> tuple[str, TranscoderSet]:
    """(model spec, the set) from a set made by `train --transcoders`, a circuit-tracer directory (config.yaml and
    its safetensors files), or `hf:ORG/REPO[/SUBPATH]` of one. A circuit-tracer set that names no model gives ""."""
    from nanosae.interp import circuit_tracer
    from nanosae.sae.foreign import is_hub, resolve_hub
    from nanosae.train.cross_layer import load_later

    run = resolve_hub(str(run)) if is_hub(run) else Path(run)
    if circuit_tracer.is_circuit_tracer(run):
        model, by_layer, decoders = circuit_tracer.load(run, device)
        return model, TranscoderSet(by_layer, decoders)
    manifest = TranscoderSetDir(run).read_manifest()
    tset = TranscoderSet({})
    for layer, where in manifest["layers"].items():
        tc = SAE.load(run / where / "sae", device=device)
        if (tc.cfg.hook_name, tc.cfg.hook_name_out) != mlp_hooks(int(layer)):
            raise FormatError(
                f"{run / where}: reads {tc.cfg.hook_name} and writes {tc.cfg.hook_name_out}, expected "
                f"{' -> '.join(mlp_hooks(int(layer)))}"
            )
        tset.by_layer[int(layer)] = tc.eval()
    if manifest.get("cross_layer"):
        for layer in tset.layers[:-1]:
            tc = tset[layer]
            later = [j for j in tset.layers if j > layer]
            tset.later[layer] = load_later(
                run / manifest["layers"][str(layer)], later, tc.cfg.d_sae, tc.cfg.d_out, device
            )
    return manifest["model"], tset


def skip_term(tc: SAE, x: Tensor) -> Tensor | float:
    """A skip transcoder's linear term x W_skip^T in the model's units (0 without one)."""
    skip = tc.skip(tc.normalize_input(tc.check_input(x))[0]) if tc.cfg.skip_connection else 0.0
    return tc.denormalize(skip, None) if isinstance(skip, Tensor) else skip


# ---- the clean pass and the replacement model -----------------------------------------------------------------
@dataclass
class CleanPass:
    tokens: Tensor  # (1, T)
    logits: Tensor  # (T, vocab)
    embeddings: Tensor  # (T, d_model): block 0's input
    latents: dict[int, Tensor]  # per layer (T, d_sae)
    errors: dict[int, Tensor]  # per layer (T, d_model): MLP output minus the transcoder's
    silent: int = 0  # the first positions whose error nodes get no edges (constants of the frozen model): BOS


@contextlib.contextmanager
def token_embeddings(model: HostModel, fn: Any) -> Iterator[None]:
    """Inside: fn reads or replaces the token embeddings where the replacement model takes them as a source:
    block 0's input, or for nanochat the normed (and smeared) embedding x0 that every block reads."""
    from nanosae.models.nanochat import NanochatGPT

    if isinstance(model.module, NanochatGPT):
        handle = model.module.embed_out.register_forward_hook(lambda module, args, out: fn(out))
        try:
            yield
        finally:
            handle.remove()
    else:
        with model.hooks({"blocks.0.hook_resid_pre": fn}):
            yield


@torch.no_grad()
def clean_pass(model: HostModel, transcoders: TranscoderSet, tokens: Tensor) -> CleanPass:
    names = [h for layer in transcoders for h in transcoders.hooks(layer)]
    seen: list[Tensor] = []
    with token_embeddings(model, seen.append):
        logits, cache = model.run_with_cache(tokens, names)
    latents = {layer: tc.encode(cache[tc.cfg.hook_name][0]) for layer, tc in transcoders.items()}
    errors = {}
    for layer in transcoders.layers:
        x, y = (cache[h][0] for h in transcoders.hooks(layer))
        errors[layer] = y - transcoders.output(layer, latents, x).to(y.dtype)
    return CleanPass(model.as_tokens(tokens), logits[0], seen[0][0], latents, errors)


def replacement_forward(
    model: HostModel,
    transcoders: TranscoderSet,
    tokens: Tensor,
    embeddings: Tensor,
    latents: dict[int, Tensor] | None = None,
    errors: dict[int, Tensor] | None = None,
    stop_at_layer: int | None = None,
    mlp_inputs: dict[int, Tensor] | None = None,
    written: dict[int, Tensor] | None = None,
    last_only: bool = False,
) -> Tensor | None:
    """The model with its token embeddings set to `embeddings` and each transcoder layer's MLP output replaced by
    the set's output for those latents plus errors (batched like tokens); or, with `written`, by written[L] plus
    the skip term. Returns the logits (None when stopped early); mlp_inputs receives each layer's MLP input."""
    seen: dict[int, Tensor] = {} if mlp_inputs is None else mlp_inputs
    if written is None:
        assert latents is not None and errors is not None  # what the layers write, when not given
        written = {L: transcoders.decode(L, latents) + errors[L] for L in transcoders.layers}
    hooks: dict[str, Any] = {}
    last = None if stop_at_layer is None else stop_at_layer - 1

    def record(x: Tensor, layer: int) -> None:
        seen[layer] = x
        if layer == last:  # nothing after the last MLP input read is needed: not even that layer's MLP
            raise StopForward

    for layer, tc in transcoders.items():
        read, write = transcoders.hooks(layer)
        hooks[read] = lambda x, layer=layer: record(x, layer)
        hooks[write] = lambda y, layer=layer, tc=tc: (written[layer] + skip_term(tc, seen[layer])).to(y.dtype)
    with (
        token_embeddings(model, lambda _: embeddings),
        model.hooks(hooks, stop_at_layer=stop_at_layer),
        model.skipping_mlps(transcoders.layers),
    ):
        try:
            return model.logits(tokens, last_only)
        except StopForward:
            return None


# ---- freezing attention patterns and norm scales ---------------------------------------------------------------
def _frozen_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """The model family's own eager attention with queries and keys detached: the pattern is a constant."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query.detach(), key.detach(), value, attention_mask, **kwargs)


class Pins:
    """Values one forward records (attention patterns, norm scales) and later forwards of the same shape replay:
    an intervention run with the clean run's patterns, as circuit-tracer's freeze_attention."""

    def __init__(self) -> None:
        self.recording = True
        self.kept: dict[int, Tensor] = {}

    def __call__(self, module: nn.Module, value: Tensor) -> Tensor:
        if self.recording:
            self.kept[id(module)] = value.detach()
            return value
        kept = self.kept.get(id(module))
        return kept if kept is not None and kept.shape == value.shape else value  # a generated token's step: live


_PINS: Pins | None = None  # what the registered pinned attention reads, set inside `pinned`


def _pinned_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """The model family's own eager attention, its pattern the recorded one where there is one."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    assert _PINS is not None  # registered and selected only inside `pinned`
    pattern = _PINS(module, weights)
    if pattern is weights:
        return out, weights
    v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # grouped keys and values, as repeat_kv
    return torch.matmul(pattern.to(v.dtype), v).transpose(1, 2).contiguous(), pattern


def _norm_forward(module: Any, scale: Any) -> Any:
    """A forward for an RMSNorm / LayerNorm whose scale (1/rms or 1/std) passes through scale(module, s) (detached
    for autograd, or pinned); None for other modules."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):

        def layer_norm(x: Tensor) -> Tensor:
            centred = x - x.mean(-1, keepdim=True)
            out = centred * scale(module, torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps))
            return out * module.weight + module.bias if module.elementwise_affine else out

        return layer_norm
    if not name.endswith("RMSNorm"):
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or getattr(module, "weight", None) is None:
        raise ConfigError(f"cannot freeze {name}: expected an eps and a weight")
    gemma = name.startswith("Gemma")  # Gemma's RMSNorm scales by (1 + weight), in float32

    def rms_norm(x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * scale(module, torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
        if gemma:
            return (normed * (1.0 + module.weight.float())).type_as(x)
        return module.weight * normed.to(x.dtype)

    return rms_norm


_REGISTERED = False


@contextlib.contextmanager
def _patched(model: HostModel, attention: str, scale: Any) -> Iterator[None]:
    """Inside: a Hugging Face model's attention runs as the registered `attention`, and its norms (unless scale is
    None) through _norm_forward(scale)."""
    global _REGISTERED
    config = getattr(model.module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ConfigError(
            f"attribution needs a Hugging Face model or a nanochat checkpoint loaded by nanosae "
            f"(got {type(model.module).__name__})"
        )
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        for name, fn in (("nanosae_frozen", _frozen_attention), ("nanosae_pinned", _pinned_attention)):
            AttentionInterface.register(name, fn)
            AttentionMaskInterface.register(name, eager_mask)
        _REGISTERED = True
    norms = [m for m in model.module.modules() if scale is not None and _norm_forward(m, scale) is not None]
    patched = [(m, m.__dict__.get("forward")) for m in norms]
    old = config._attn_implementation
    try:
        config._attn_implementation = attention
        for m in norms:
            m.forward = _norm_forward(m, scale)
        yield
    finally:
        config._attn_implementation = old
        for m, forward in patched:
            if forward is None:
                del m.forward
            else:
                m.forward = forward


@contextlib.contextmanager
def frozen(model: HostModel) -> Iterator[None]:
    """Inside: attention patterns and norm scales are constants for autograd (values unchanged); nanochat's
    gates too, and its logits come before the softcap (models.nanochat.frozen_for_attribution)."""
    from nanosae.models.nanochat import NanochatGPT, frozen_for_attribution

    if isinstance(model.module, NanochatGPT):
        with frozen_for_attribution(model.module):
            yield
        return
    with _patched(model, "nanosae_frozen", lambda module, s: s.detach()):
        yield


@contextlib.contextmanager
def pinned(model: HostModel, pins: Pins, norms: bool = False) -> Iterator[None]:
    """Inside: attention patterns (and with norms, norm scales) are recorded by the first forward, while
    pins.recording, and replayed by later ones of the same length."""
    global _PINS
    from nanosae.models.nanochat import NanochatGPT

    if isinstance(model.module, NanochatGPT):
        raise ConfigError(
            "--freeze-attention and --constrained-layers need a Hugging Face model: nanochat's attention has no "
            "pinned form; intervene without them"
        )
    _PINS = pins
    try:
        with _patched(model, "nanosae_pinned", pins if norms else None):
            yield
    finally:
        _PINS = None


# ---- the graph ---------------------------------------------------------------------------------------------
@dataclass
class Graph:
    """An attribution graph: adjacency[target, source] = direct effect, nodes in the order [features (layer, pos,
    latent), error nodes (layer-major over positions), input tokens, logits]."""

    prompt: str
    tokens: list[int]
    token_strs: list[str]
    layers: list[int]  # transcoder layers, in order
    features: Tensor  # (n, 3) layer, position, latent
    activations: Tensor  # (n,)
    logit_tokens: list[int]
    logit_probs: list[float]
    adjacency: Tensor  # (N, N)
    explored: Tensor  # (N,) bool: rows computed (every logit; features within max_feature_nodes)
    model: str = ""
    transcoders: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + self.layers.index(layer) * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + len(self.layers) * self.n_pos + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + (len(self.layers) + 1) * self.n_pos + i


def top_logits(logits: Tensor, probability: float = 0.95, at_most: int = 10) -> tuple[list[int], list[float]]:
    """The most likely next tokens until their probabilities add up to `probability` (at most `at_most`)."""
    probs = logits.float().softmax(-1)
    values, ids = probs.sort(descending=True)
    n = int((values.cumsum(0) < probability).sum()) + 1
    n = max(1, min(n, at_most))
    return ids[:n].tolist(), values[:n].tolist()


class FrozenPass:
    """The frozen replacement model run forward once over `copies` copies of the prompt, its graph kept: each batch
    of targets is then one backward pass, target b's gradient seeded in copy b (as circuit-tracer does).

    Each transcoder layer's MLP output is a leaf holding what the set writes there on the prompt (the features'
    decoded activations, b_dec and the error node; the skip term stays computed from the MLP input), so one
    backward gives every source's edge: an error node's is its gradient there · its vector, a feature's the
    gradients at the outputs it writes to · its decoder rows · its activation (direct effects: the paths through
    other features are cut), a token's the gradient at the embeddings · its embedding. Feature targets are
    pre-activations, functions of their layer's MLP input; the frozen model is linear, so each one's gradient there
    is a constant vector (`seed`), injected where that input is. With logits, the pass runs to the end; without,
    it stops after the last transcoder layer."""

    def __init__(
        self,
        model: HostModel,
        transcoders: TranscoderSet,
        clean: CleanPass,
        features: Tensor,
        activations: Tensor,
        copies: int,
        logits: bool,
    ) -> None:
        self._sources(transcoders, clean, features, activations)
        layers = transcoders.layers
        with torch.no_grad():
            written = {L: transcoders.decode(L, clean.latents) + clean.errors[L] for L in layers}
        self.emb = clean.embeddings.expand(copies, -1, -1).clone().requires_grad_(True)
        self.out = {L: w.expand(copies, -1, -1).clone().requires_grad_(True) for L, w in written.items()}
        self.inputs: dict[int, Tensor] = {}
        with torch.enable_grad(), frozen(model):
            self.logits = replacement_forward(
                model,
                transcoders,
                clean.tokens.expand(copies, -1),
                self.emb,
                stop_at_layer=None if logits else max(layers) + 1,
                mlp_inputs=self.inputs,
                written=self.out,
                last_only=True,  # the targets are next-token logits
            )

    def _sources(self, transcoders: TranscoderSet, clean: CleanPass, features: Tensor, activations: Tensor) -> None:
        self.transcoders, self.clean, self.features, self.activations = transcoders, clean, features, activations
        layers = transcoders.layers
        self.mine = {L: (features[:, 0] == L).nonzero().squeeze(1) for L in layers}
        self.written_to = {L: transcoders.targets(L) for L in layers}
        # per layer and position: its features' indices and decoder rows into every output they write to, flat
        # (n_here, n_targets · d), so a feature's edge is one product with the gradients at its position
        self.by_position: dict[int, list[tuple[int, Tensor, Tensor]]] = {}
        with torch.no_grad():
            for L in layers:
                rows = transcoders.rows_to_targets(L, features[self.mine[L], 2]).flatten(1).float()
                positions = features[self.mine[L], 1]
                self.by_position[L] = [
                    (int(p), self.mine[L][positions == p], rows[positions == p]) for p in positions.unique().tolist()
                ]

    def seed(self, layer: int, positions: list[int], latents: list[int]) -> Tensor:
        """d pre-activation / d MLP input for each (position, latent) of `layer`, at the clean input."""
        tc = self.transcoders[layer]
        factor = tc.input_factor()
        if tc.arch.pre_acts is None and tc.cfg.normalize_activations == "none" and isinstance(factor, float):
            return tc.W_enc[:, latents].T.detach() * factor  # pre = (s·x − b) W_enc + b_enc
        x = self.inputs[layer][0, positions].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            pre = tc.pre_acts(tc.normalize_input(tc.check_input(x))[0])
            picked = pre.gather(1, torch.tensor(latents, device=pre.device)[:, None]).sum()
            return torch.autograd.grad(picked, x)[0]

    def gradients(
        self, targets: list[tuple[str, int, int, int]], contrast: dict[int, int] | None = None
    ) -> tuple[Tensor, dict[int, Tensor | None]]:
        """Target b's gradient, in row b, at the token embeddings (n, T, d) and at each transcoder layer's MLP
        output (None where no target depends on it)."""
        n, T = len(targets), self.clean.tokens.shape[1]
        outputs, seeds = [], []
        for layer, (copies, positions, latents) in feature_targets(targets).items():
            seed = torch.zeros_like(self.inputs[layer])
            seed[copies, positions] = self.seed(layer, positions, latents).to(seed.dtype)
            outputs.append(self.inputs[layer])
            seeds.append(seed)
        logit_targets = [(b, pos, index) for b, (kind, _, pos, index) in enumerate(targets) if kind == "logit"]
        if logit_targets:
            assert self.logits is not None  # a pass for logit targets runs to the end
            seed = torch.zeros_like(self.logits)
            first = T - seed.shape[1]  # the logits held: the last position's
            for b, pos, index in logit_targets:
                seed[b, pos - first] = logit_seed(seed.shape[-1], index, contrast)
            outputs.append(self.logits)
            seeds.append(seed)
        sources = [self.emb] + [self.out[L] for L in self.transcoders.layers]
        grads = torch.autograd.grad(outputs, sources, seeds, retain_graph=True, allow_unused=True)
        return grads[0][:n], {L: (g[:n] if g is not None else None) for L, g in zip(self.transcoders.layers, grads[1:])}

    def rows(self, targets: list[tuple[str, int, int, int]], contrast: dict[int, int] | None = None) -> Tensor:
        """Rows of the adjacency for targets ("feature", layer, pos, latent) or ("logit", -1, pos, token id) (its
        logit minus the mean logit, or minus the logit of contrast[token id]), over the sources [every active
        feature, error nodes, tokens]."""
        clean, tset, T, n = self.clean, self.transcoders, self.clean.tokens.shape[1], len(targets)
        emb_grad, grads = self.gradients(targets, contrast)
        at = {L: (g.float() if g is not None else None) for L, g in grads.items()}
        Tg, d = emb_grad.shape[1], emb_grad.shape[2]  # gradients may stop before T: the later ones are zero
        feature_cols = torch.zeros(n, len(self.features))
        for L in tset.layers:  # the gradients where a feature writes (n, Tg, n_targets · d) · its decoder rows there
            into = [at[j] for j in self.written_to[L]]
            if all(g is None for g in into) or not self.by_position[L]:
                continue
            parts = [x if x is not None else torch.zeros(n, Tg, d) for x in into]
            g = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
            for p, here, rows in self.by_position[L]:
                if p < Tg:
                    feature_cols[:, here] = g[:, p] @ rows.T
        feature_cols *= self.activations
        error_cols = torch.zeros(n, len(tset), T)
        for i, grad in enumerate(at.values()):
            if grad is not None:
                error_cols[:, i, :Tg] = (grad * clean.errors[tset.layers[i]][:Tg]).sum(-1)
        error_cols[:, :, : clean.silent] = 0
        token_cols = torch.zeros(n, T)
        token_cols[:, :Tg] = (emb_grad.float() * clean.embeddings[:Tg]).sum(-1)
        return torch.cat([feature_cols, error_cols.flatten(1).float(), token_cols.float()], 1).detach()


def feature_targets(targets: list[tuple[str, int, int, int]]) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """The feature targets among `targets`, by layer: (their rows in the batch, positions, latents)."""
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for b, (kind, layer, pos, index) in enumerate(targets):
        if kind == "feature":
            by_layer.setdefault(layer, []).append((b, pos, index))
    return {layer: tuple(list(v) for v in zip(*items)) for layer, items in by_layer.items()}  # type: ignore[misc]


def logit_seed(vocab: int, token: int, contrast: dict[int, int] | None) -> Tensor:
    """d(logit[token] − the mean logit), or − the logit of contrast[token], over the logits."""
    versus = contrast.get(token) if contrast else None
    seed = torch.full((vocab,), -1 / vocab) if versus is None else torch.zeros(vocab)
    seed[token] += 1
    if versus is not None:
        seed[versus] -= 1
    return seed


LINEAR_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # pre-norm decoders: RMSNorm, attention, RMSNorm, MLP


class LinearPass(FrozenPass):
    """FrozenPass's gradients written out for the pre-norm decoders of LINEAR_FAMILIES (Llama, SmolLM, Mistral,
    Qwen2/3) with a transcoder at every layer's MLP. The frozen model is linear, so its backward is, from the top
    layer down: at each MLP input the norm's frozen scale, then o_proj's transpose, each head's pattern transposed,
    v_proj's transpose and the first norm's frozen scale. One forward of one copy records the patterns and scales
    (not a forward over a copy per target whose graph autograd keeps), and each target's backward covers only the
    layers up to its own and the positions up to its own (under causal attention later positions get no
    gradient): the same rows as FrozenPass's, without that work."""

    def __init__(
        self,
        model: HostModel,
        transcoders: TranscoderSet,
        clean: CleanPass,
        features: Tensor,
        activations: Tensor,
        copies: int = 0,
        logits: bool = True,
    ) -> None:
        self._sources(transcoders, clean, features, activations)
        pins, self.inputs = Pins(), {}
        with torch.no_grad():
            written = {L: transcoders.decode(L, clean.latents)[None] + clean.errors[L] for L in transcoders.layers}
            with pinned(model, pins, norms=True):
                replacement_forward(
                    model,
                    transcoders,
                    clean.tokens,
                    clean.embeddings[None],
                    mlp_inputs=self.inputs,
                    written=written,
                    last_only=True,
                )
        self.logits = None
        hf: Any = model.module
        config = hf.config

        def scale(norm: Any) -> Tensor:  # the norm's frozen 1/rms per position (T, 1)
            return pins.kept[id(norm)][0].float()

        self.blocks = []
        for block in hf.model.layers:
            attn, norm1, norm2 = block.self_attn, block.input_layernorm, block.post_attention_layernorm
            self.blocks.append(
                (
                    scale(norm1),
                    pins.kept[id(attn)][0].float(),  # (H, T, T)
                    attn.o_proj.weight,  # (d, H · dh)
                    attn.v_proj.weight * norm1.weight,  # (KV · dh, d): into the first norm's weight
                    scale(norm2) * norm2.weight.float(),  # (T, d)
                )
            )
        self.final = scale(hf.model.norm) * hf.model.norm.weight.float()
        self.unembed = hf.lm_head.weight
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = self.blocks[0][2].shape[1] // self.heads

    @staticmethod
    def supports(model: HostModel, transcoders: TranscoderSet) -> bool:
        """Whether the model is of LINEAR_FAMILIES and every layer's MLP is replaced by a transcoder reading its
        normed input: otherwise FrozenPass (autograd through whatever the model computes)."""
        config = getattr(model.module, "config", None)
        return (
            getattr(config, "model_type", None) in LINEAR_FAMILIES
            and transcoders.layers == list(range(model.n_layers))
            and all(transcoders.hooks(L) == mlp_hooks(L) for L in transcoders.layers)
        )

    @staticmethod
    def bytes_held(model: HostModel, transcoders: TranscoderSet, T: int) -> tuple[int, int]:
        """(per target, once) bytes a backward holds at most, in float32: per target its gradients at the
        embeddings and at every MLP output, their concatenation over the outputs one layer's features write to
        and one layer's work; once, the recorded patterns, norm scales and MLP inputs."""
        d, L = model.d_model, model.n_layers
        config: Any = model.module.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        widest = max(len(transcoders.targets(layer)) for layer in transcoders.layers)
        per_target = T * (d * (L + 1 + widest + 4) + 2 * heads * head_dim)
        return 4 * per_target, 4 * (L * heads * T * T + 3 * L * T * d)

    def gradients(
        self, targets: list[tuple[str, int, int, int]], contrast: dict[int, int] | None = None
    ) -> tuple[Tensor, dict[int, Tensor | None]]:
        n, d = len(targets), self.clean.embeddings.shape[-1]
        H, KV, dh = self.heads, self.kv_heads, self.head_dim
        reach = torch.tensor([pos for _, _, pos, _ in targets])  # nothing after a target's position moves it
        last = len(self.blocks) - 1
        start = torch.tensor([layer if kind == "feature" else last for kind, layer, _, _ in targets])
        Tm = int(reach.max()) + 1
        top = int(start.max())
        # the gradient at the residual stream before each layer and after the top one (one buffer, filled in
        # place, so a batch's transient tensors are the same few sizes layer after layer and memory is reused)
        resid = torch.zeros(top + 2, n, Tm, d)
        logit_targets = [(b, pos, index) for b, (kind, _, pos, index) in enumerate(targets) if kind == "logit"]
        if logit_targets:
            b, pos, index = (list(v) for v in zip(*logit_targets))
            seeds = torch.stack([logit_seed(self.unembed.shape[0], t, contrast) for t in index])
            resid[top + 1, b, pos] = mm(seeds, self.unembed) * self.final[pos]
        by_layer = feature_targets(targets)
        live = torch.arange(Tm)[None, :] <= reach[:, None]  # (n, Tm)
        mid, heads = torch.empty(n, Tm, d), torch.empty(n * Tm, H * dh)
        for layer in range(top, -1, -1):
            norm1, pattern, W_O, W_V, norm2 = self.blocks[layer]
            mid.copy_(resid[layer + 1])  # the MLP output adds to the residual stream: its gradient is this
            if layer in by_layer:  # a target's gradient at its MLP's normed input, through the norm
                copies, positions, latents = by_layer[layer]
                seeds = self.seed(layer, positions, latents).float() * norm2[positions]
                mid.index_put_((torch.tensor(copies), torch.tensor(positions)), seeds, accumulate=True)
            tc = self.transcoders[layer]
            if tc.cfg.skip_connection:  # the skip term is computed from the MLP input
                x = self.inputs[layer][:, :Tm].expand(n, -1, -1).clone().requires_grad_(True)
                with torch.enable_grad():
                    out = torch.as_tensor(skip_term(tc, x))
                    (through_skip,) = torch.autograd.grad(out, x, resid[layer + 1].to(x.dtype))
                mid += through_skip.float() * norm2[:Tm]
            rows = (live & (start[:, None] >= layer)).flatten().nonzero().squeeze(1)
            heads.zero_()
            heads[rows] = mm(mid.view(-1, d)[rows], W_O)
            values = torch.einsum("hqk,bqhe->bkhe", pattern[:, :Tm, :Tm], heads.view(n, Tm, H, dh))
            values = values.reshape(n, Tm, KV, H // KV, dh).sum(3).view(n * Tm, KV * dh)  # heads share K/V
            resid[layer].copy_(mid)
            resid[layer].view(-1, d).index_add_(0, rows, mm(values[rows], W_V) * norm1[rows % Tm])
        grads = {L: resid[L + 1] if L <= top else None for L in self.transcoders.layers}
        return resid[0], grads


def mm(a: Tensor, weight: Tensor) -> Tensor:
    """a @ weight in the weight's dtype (no float32 copy of a half-precision model), the result in float32."""
    return (a.to(weight.dtype) @ weight).float()


# A process's peak memory over what its tensors hold (the allocator's free lists, transient buffers of the backward
# passes), and what a trace allocates whatever its size (the clean pass, autograd's first backward): measured by
# benchmarks/trace_memory.py, so the estimate errs high rather than low.
PEAK_OVER_HELD = 1.45
TRACE_OVERHEAD = 512 << 20


@dataclass
class MemoryEstimate:
    """What a trace adds to memory beyond the model and transcoders already loaded, in bytes: the frozen passes
    kept for backward (per copy of the prompt, measured on one copy: the logit pass's and the feature pass's; the
    first is freed before the second is made, but the allocator seldom gives that memory back, so both count),
    and the graph's rows and adjacency; fixed also holds the clean pass and the two one-copy passes measured."""

    feature_copy: int
    logit_copy: int
    n_logits: int
    rows_per_feature: int
    fixed: int  # the logits' rows, the adjacency, the seeds

    def total(self, batch_size: int, traced: int) -> int:
        passes = self.logit_copy * self.n_logits + self.feature_copy * min(batch_size, max(traced, 1))
        return passes + self.rows_per_feature * traced + self.fixed + TRACE_OVERHEAD

    def largest_batch(self, limit: int, traced: int) -> int:
        """The largest batch size whose total fits in `limit` (0 if none does)."""
        room = limit - self.rows_per_feature * traced - self.fixed - self.logit_copy * self.n_logits - TRACE_OVERHEAD
        return max(0, min(traced, room // max(self.feature_copy, 1)))


def pass_bytes(build: Any, exclude: set[int]) -> int:
    """Bytes a frozen pass holds: what autograd keeps for backward while build() runs, its leaves, MLP inputs and
    logits (each storage once; storages in `exclude`, the weights, not counted), and for a logit pass the seed
    and gradient its backward makes, each the logits' size."""
    seen: dict[int, int] = {}

    def count(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        frozen_pass = build()
    for t in frozen_pass.inputs.values():
        count(t)
    leaves = sum(t.untyped_storage().nbytes() for t in [frozen_pass.emb, *frozen_pass.out.values()])
    logits = 0 if frozen_pass.logits is None else frozen_pass.logits.untyped_storage().nbytes()
    return sum(seen.values()) + 2 * leaves + 3 * logits  # leaves and their gradients


def estimate_memory(
    model: HostModel,
    transcoders: TranscoderSet,
    clean: CleanPass,
    features: Tensor,
    activations: Tensor,
    n_logits: int,
    traced: int,
) -> MemoryEstimate:
    """A trace's memory, measured on one copy of the prompt's frozen pass (feature and logit) and counted for the
    graph."""
    T, n_f = clean.tokens.shape[1], len(features)
    if LinearPass.supports(model, transcoders):
        one, once = LinearPass.bytes_held(model, transcoders, T)
        per_copy = {False: PEAK_OVER_HELD * one, True: PEAK_OVER_HELD * one}
    else:
        once = 0
        weights = {p.untyped_storage().data_ptr() for p in model.module.parameters()}
        weights |= {p.untyped_storage().data_ptr() for tc in transcoders.by_layer.values() for p in tc.parameters()}
        per_copy = {
            logits: PEAK_OVER_HELD
            * pass_bytes(
                lambda logits=logits: FrozenPass(model, transcoders, clean, features, activations, 1, logits), weights
            )
            for logits in (False, True)
        }
    n_src = n_f + (len(transcoders) + 1) * T
    n_nodes = traced + (len(transcoders) + 1) * T + n_logits
    clean_bytes = sum(t.untyped_storage().nbytes() for t in [*clean.latents.values(), *clean.errors.values()])
    # every active feature's decoder rows into the outputs it writes to, gathered once for its edges
    rows = sum(int((features[:, 0] == L).sum()) * len(transcoders.targets(L)) for L in transcoders.layers)
    return MemoryEstimate(
        feature_copy=int(per_copy[False]),
        logit_copy=int(per_copy[True]),
        n_logits=n_logits,
        rows_per_feature=(8 if traced < n_f else 4) * n_src,  # ranking keeps each row normalized too
        fixed=4 * (n_logits * n_src + n_nodes * n_nodes + rows * model.d_model)
        + 2 * clean_bytes
        + int(sum(per_copy.values()))
        + once,
    )


def available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable), or None where /proc/meminfo does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def attribute(
    model: HostModel,
    transcoders: TranscoderSet,
    prompt: str | list[int],
    *,
    logit_probability: float = 0.95,
    max_logits: int = 10,
    max_feature_nodes: int | None = None,
    batch_size: int = 32,
    skip_bos_features: bool = True,
    targets: list[int] | None = None,
    contrast: int | None = None,
    memory_limit: int | None = None,
    on_estimate: Any = None,
    progress: Any = None,
) -> Graph:
    """The attribution graph of a prompt (text, or token ids with BOS first) over the transcoders.

    max_feature_nodes: trace (compute the incoming edges of) at most this many features, chosen in rounds by
    their influence on the logits as estimated from the rows computed so far; the graph holds the traced
    features (all active ones when None), and the others' effects are left out, as circuit-tracer does.
    skip_bos_features: leave out the features at the BOS position (the same on every prompt: the attention sink's
    large-norm state, which otherwise heads every path) and give its error nodes no edges (transcoders never
    train on BOS, so its errors are large and would head the graph), as circuit-tracer does; the BOS
    position still computes what it computes (those become constants of the frozen model), its token node
    stays.
    targets: trace these next tokens' logits instead of the most likely ones; contrast: a token whose logit is
    subtracted from each target's (a logit difference, e.g. " Paris" against " London") instead of the mean.
    memory_limit: bytes the trace may add (e.g. available_memory()); a trace estimated to need more is refused
    after the clean pass, before the expensive part, naming the settings that would fit. The estimate (two
    one-copy passes, made only when memory_limit or on_estimate asks for it) goes to graph.info["memory_estimate"]
    and to on_estimate(bytes) before the work starts."""
    tokens = model.prompt_ids(prompt)
    clean = clean_pass(model, transcoders, torch.tensor([tokens]))
    layers = transcoders.layers
    first = 1 if skip_bos_features and tokens[0] == model.tokenizer.bos_id else 0
    clean.silent = first
    feats = [(L, p, i) for L in layers for p, i in clean.latents[L].nonzero().tolist() if p >= first]
    features = torch.tensor(feats, dtype=torch.long).reshape(-1, 3)
    activations = torch.tensor([float(clean.latents[L][p, i]) for L, p, i in feats])
    if targets:
        probs = clean.logits[-1].float().softmax(-1)
        logit_ids, logit_probs = list(targets), [float(probs[t]) for t in targets]
    else:
        logit_ids, logit_probs = top_logits(clean.logits[-1], logit_probability, max_logits)
    versus = {t: contrast for t in logit_ids} if contrast is not None else None
    n_f, T, n_l = len(feats), len(tokens), len(logit_ids)
    # rows computed so far, over the sources [all active features, errors, tokens]; a row's node id is its
    # feature's index, or n_src + j for logit j (errors and tokens have no incoming edges)
    logit_targets = [("logit", -1, T - 1, t) for t in logit_ids]
    linear = LinearPass.supports(model, transcoders)
    Pass = LinearPass if linear else FrozenPass
    logit_pass = Pass(model, transcoders, clean, features, activations, n_l, logits=True)
    rows = [logit_pass.rows(logit_targets, versus)]
    n_src = n_f + (len(layers) + 1) * T
    row_ids = list(range(n_src, n_src + n_l))  # logits: after every source
    weights = torch.tensor(logit_probs)
    traced: list[int] = []
    budget = n_f if max_feature_nodes is None else min(n_f, max_feature_nodes)
    ranked = budget < n_f
    if ranked:  # the rows known so far, normalized once each, for ranking: logits first, then as traced
        normed = torch.zeros(n_l + budget, n_src + n_l)
        normed[:n_l, :n_src] = normalized(rows[0])
    need = None
    if memory_limit is not None or on_estimate is not None:
        estimate = estimate_memory(model, transcoders, clean, features, activations, n_l, budget)
        need = estimate.total(batch_size, budget)
        if memory_limit is not None and need > memory_limit:
            fits = estimate.largest_batch(memory_limit, budget)
            hint = f"--batch-size {fits}" if fits else "fewer --max-feature-nodes or a shorter prompt"
            raise ConfigError(
                f"this trace needs about {need / 2**30:.1f} GiB more memory ({T} tokens, {n_f} active features, "
                f"batch {batch_size}) and {memory_limit / 2**30:.1f} GiB is available: use {hint}"
            )
        if on_estimate is not None:
            on_estimate(need)
    if budget:
        copies = min(batch_size, budget)
        frozen_pass = logit_pass if linear else Pass(model, transcoders, clean, features, activations, copies, False)
    while len(traced) < budget:
        if not ranked:  # every feature is traced: no ranking needed, and layer order keeps backward passes short
            order = list(range(len(traced), n_f))
        else:  # the most influential untraced features, by the rows known so far
            ids = torch.tensor(row_ids[len(traced) :] + row_ids[: len(traced)])  # normed's order: logits first
            row_weights = torch.cat([weights, torch.zeros(len(traced))])
            influence = propagate(normed[: n_l + len(traced)], ids, row_weights)[:n_f]
            influence[traced] = -1
            order = influence.argsort(descending=True).tolist()
        chosen = sorted(order[: min(batch_size, budget - len(traced))], key=lambda i: feats[i][0])
        rows.insert(len(rows) - 1, frozen_pass.rows([("feature", *feats[i]) for i in chosen]))
        if ranked:
            normed[n_l + len(traced) : n_l + len(traced) + len(chosen), :n_src] = normalized(rows[-2])
        row_ids = row_ids[: len(traced)] + chosen + row_ids[len(traced) :]
        traced += chosen
        if progress is not None:
            progress(len(traced), budget)
    known = torch.cat(rows)  # rows in the order traced features..., logits
    keep = sorted(traced)  # the graph's features, in (layer, position, latent) order
    columns = torch.tensor(keep + list(range(n_f, n_src)), dtype=torch.long)
    n_nodes = len(keep) + (len(layers) + 1) * T + n_l
    adjacency = torch.zeros(n_nodes, n_nodes)
    where = {f: i for i, f in enumerate(traced)}
    for new, f in enumerate(keep):
        adjacency[new, : len(columns)] = known[where[f], columns]
    adjacency[n_nodes - n_l :, : len(columns)] = known[len(traced) :, columns]
    graph = Graph(
        prompt if isinstance(prompt, str) else model.tokenizer.decode(tokens[1:]),
        tokens,
        [model.tokenizer.decode([t]) for t in tokens],
        layers,
        features[keep],
        activations[keep],
        logit_ids,
        logit_probs,
        adjacency,
        torch.ones(n_nodes, dtype=torch.bool),
        model=model.name,
    )
    graph.info["logit_strs"] = {t: model.tokenizer.decode([t]) for t in logit_ids}
    if contrast is not None:
        graph.info["contrast"] = model.tokenizer.decode([contrast])
    graph.info["active_features"] = n_f
    if need is not None:
        graph.info["memory_estimate"] = need
    graph.info["n_layers"] = model.n_layers
    graph.info["generation_settings"] = {
        "max_n_logits": max_logits,
        "desired_logit_prob": logit_probability,
        "batch_size": batch_size,
        "max_feature_nodes": budget,
        "skip_bos_features": skip_bos_features,
    }
    return graph


# ---- influence, pruning, scores ------------------------------------------------------------------------------
def logit_weights(graph: Graph) -> Tensor:
    w = torch.zeros(len(graph.adjacency))
    w[graph.logit_index(0) :] = torch.tensor(graph.logit_probs)
    return w


def normalized(adjacency: Tensor) -> Tensor:
    """|A| with each target's incoming edges summing to 1 (rows without inputs stay 0)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def node_influence(adjacency: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """Each node's total (direct and indirect) influence on the weighted logits: w·(A + A² + …) on the
    normalized graph (a DAG, so the series ends)."""
    return influence_from_rows(adjacency, torch.arange(len(adjacency)), weights, len(adjacency), max_iter)


def influence_from_rows(rows: Tensor, row_ids: Tensor, row_weights: Tensor, n: int, max_iter: int = 1000) -> Tensor:
    """node_influence when only some rows (targets row_ids, with logit weights row_weights) of the adjacency over
    n sources are known: the others have no inputs, so every product touches those rows alone."""
    a = normalized(rows[:, :n])
    if a.shape[1] < n:  # targets that are never sources (logits): zero columns
        a = torch.cat([a, a.new_zeros(len(a), n - a.shape[1])], 1)
    return propagate(a, row_ids, row_weights, max_iter)


def propagate(a: Tensor, row_ids: Tensor, row_weights: Tensor, max_iter: int = 1000) -> Tensor:
    """influence_from_rows on rows already normalized, over every node (a trace keeps them so as it goes).

    Influence only flows on through the known rows, so the series w·(A + A² + …) is summed among them alone
    (k × k products, not k × n) and spread over every node once: w·A + (Σ_i s_i)·A with s_0 = w·A[:, rows] and
    s_(i+1) = s_i·A[:, rows]."""
    among = a[:, row_ids]
    step = row_weights @ among
    reached = row_weights + step
    for _ in range(max_iter):
        step = step @ among
        if not bool(step.any()):
            break
        reached += step
    return reached @ a


def _threshold(scores: Tensor, share: float) -> float:
    """The score above which the highest scores add up to `share` of the total."""
    values = scores.flatten().sort(descending=True).values
    cumulative = values.cumsum(0) / values.sum().clamp_min(1e-12)
    return float(values[min(int(torch.searchsorted(cumulative, torch.tensor(share))), len(values) - 1)])


def cumulative_influence(graph: Graph, rank_tokens: bool = False) -> Tensor:
    """For each feature and error node, the share of their influence on the logits carried by the nodes more
    influential than it: the graph file's `influence`, which viewers filter on (shown when <= the node
    threshold), so exactly the nodes pruning keeps are shown, and the kept ones carry at least the threshold's
    share. Tokens and logits, always kept, get 0. One population for the cut and the field.

    rank_tokens: circuit-tracer's field instead: every node ranked together, each given the share carried by
    itself and the nodes more influential than it."""
    if rank_tokens:
        influence = node_influence(graph.adjacency, logit_weights(graph))
        order = influence.argsort(descending=True)
        cumulative = torch.zeros(len(influence))
        cumulative[order] = influence[order].cumsum(0) / influence.sum().clamp_min(1e-12)
        return cumulative
    influence = node_influence(graph.adjacency, logit_weights(graph))[: graph.token_index(0)]
    order = influence.argsort(descending=True)
    before = influence[order].cumsum(0) - influence[order]
    cumulative = torch.zeros(len(graph.adjacency))
    cumulative[order] = (before / influence.sum().clamp_min(1e-12)).clamp(max=1.0)
    return cumulative


def prune(
    graph: Graph, node_share: float = NODE_THRESHOLD, edge_share: float = EDGE_THRESHOLD, rank_tokens: bool = False
) -> tuple[Tensor, Tensor]:
    """(node mask, edge mask) keeping the features and error nodes that carry `node_share` of their influence on
    the logits (cumulative_influence < node_share; all of them at 1), then the edges carrying `edge_share` of the
    remaining graph's; tokens and logits always stay, and features left without incoming or outgoing edges go.

    rank_tokens: circuit-tracer's cut (graph.prune_graph): the nodes at or above the influence that brings the
    share of all nodes, input tokens included, to `node_share`. Tokens carry much of the influence, so fewer
    features and errors stay."""
    weights = logit_weights(graph)
    if rank_tokens:
        influence = node_influence(graph.adjacency, weights)
        keep = influence >= _threshold(influence, node_share)
    else:
        keep = (cumulative_influence(graph) < node_share) | (node_share >= 1)
    keep[graph.token_index(0) :] = True
    a = graph.adjacency.clone()
    a[~keep] = 0
    a[:, ~keep] = 0
    edge_scores = normalized(a) * (node_influence(a, weights) + weights)[:, None]
    edges = (edge_scores >= _threshold(edge_scores[edge_scores > 0], edge_share)) & (a != 0)
    inner = graph.token_index(0)
    while True:  # features and errors need an outgoing edge, features an incoming one (explored ones)
        before = keep.clone()
        keep[:inner] &= edges[:, :inner].any(0)
        keep[: graph.n_features] &= edges[: graph.n_features].any(1) | ~graph.explored[: graph.n_features]
        edges &= keep[:, None] & keep[None, :]
        if torch.equal(before, keep):
            return keep, edges


def scores(graph: Graph) -> dict[str, float]:
    """Replacement score: the share of end-to-end influence on the logits that starts at input tokens rather than
    error nodes. Completeness: the share of every node's inputs coming from features and tokens rather than
    errors, averaged with each node's influence on the logits as weight (Ameisen et al. 2025)."""
    weights = logit_weights(graph)
    influence = node_influence(graph.adjacency, weights) + weights
    errors = slice(graph.n_features, graph.token_index(0))
    tokens = slice(graph.token_index(0), graph.logit_index(0))
    a = normalized(graph.adjacency)
    has_inputs = a.sum(1) > 0
    non_error = torch.where(has_inputs, 1 - a[:, errors].sum(1), torch.ones(len(a)))
    token_part, error_part = float(influence[tokens].sum()), float(influence[errors].sum())
    return {
        "replacement_score": token_part / max(token_part + error_part, 1e-12),
        "completeness_score": float((non_error * influence).sum() / influence.sum().clamp_min(1e-12)),
    }


# ---- the graph file: Neuronpedia's attribution-graph layout -------------------------------------------------------
def cantor(a: int, b: int) -> int:
    """Neuronpedia's single integer for a (layer, latent) pair."""
    return (a + b) * (a + b + 1) // 2 + b


def to_neuronpedia(
    graph: Graph,
    *,
    slug: str = "nanosae-graph",
    node_share: float = NODE_THRESHOLD,
    edge_share: float = EDGE_THRESHOLD,
    n_layers: int | None = None,
    labels: dict[tuple[int, int], str] | None = None,
    scan: str | None = None,
    rank_tokens: bool = False,
) -> dict[str, Any]:
    """The pruned graph as the JSON Neuronpedia's graph viewer loads (metadata, qParams, nodes, links), which
    nanosae's viewer reads too. labels: (layer, latent) -> explanation, shown as each feature's clerp; scan: the
    id Neuronpedia files the graph under (letters, digits, dashes; default: the model's name made one)."""
    from nanosae.interp.circuit_tracer import scan_name

    keep, edges = prune(graph, node_share, edge_share, rank_tokens)
    cumulative = cumulative_influence(graph, rank_tokens)
    n_layers = n_layers or (max(graph.layers) + 1)
    labels = labels or {}
    nodes: dict[int, dict[str, Any]] = {}
    for i in keep.nonzero().squeeze(1).tolist():
        base = {
            "influence": float(cumulative[i]),
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
        }
        if i < graph.n_features:
            layer, pos, latent = graph.features[i].tolist()
            node = {
                "node_id": f"{layer}_{latent}_{pos}",
                "feature": cantor(layer, latent),
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{latent}-0",
                "activation": float(graph.activations[i]),
                "clerp": labels.get((layer, latent), ""),
            }
        elif i < graph.token_index(0):
            layer, pos = graph.layers[(i - graph.n_features) // graph.n_pos], (i - graph.n_features) % graph.n_pos
            node = {
                "node_id": f"{layer}_-1_{pos}",
                "feature": -1,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{layer}_-1-{pos}",
            }
        elif i < graph.logit_index(0):
            pos = i - graph.token_index(0)
            token = graph.tokens[pos]
            node = {
                "node_id": f"E_{token}_{pos}",
                "feature": pos,
                "layer": "E",
                "ctx_idx": pos,
                "feature_type": "embedding",
                "jsNodeId": f"E_{token}-{pos}",
                "clerp": graph.token_strs[pos],
            }
        else:
            j = i - graph.logit_index(0)
            token, p = graph.logit_tokens[j], graph.logit_probs[j]
            node = {
                "node_id": f"{n_layers + 1}_{token}_{graph.n_pos - 1}",
                "feature": token,
                "layer": str(n_layers + 1),
                "ctx_idx": graph.n_pos - 1,
                "feature_type": "logit",
                "token_prob": p,
                "is_target_logit": j == 0,
                "jsNodeId": f"L_{token}-{graph.n_pos - 1}",
                "clerp": f'Output "{graph.info.get("logit_strs", {}).get(token, token)}" (p={p:.3f})'
                + (f' minus "{graph.info["contrast"]}"' if "contrast" in graph.info else ""),
            }
        nodes[i] = base | node
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
        for t, s in edges.nonzero().tolist()
        if s in nodes and t in nodes
    ]
    used = {link["source"] for link in links} | {link["target"] for link in links}
    node_list = [n for n in nodes.values() if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan or scan_name(graph.model),
            "transcoder_list": [],
            "prompt_tokens": graph.token_strs,
            "prompt": graph.prompt,
            "node_threshold": node_share,
            "schema_version": 1,
            "info": {
                "creator_name": "nanosae",
                "transcoders": graph.transcoders,
                **scores(graph),
                "edge_threshold": edge_share,
                "rank_tokens": rank_tokens,
                "generator": {"name": "nanosae", "version": version("nanosae")},
            },
            "generation_settings": graph.info.get("generation_settings", {}),
            "pruning_settings": {"node_threshold": node_share, "edge_threshold": edge_share},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": node_list,
        "links": links,
    }


def strongest_paths(graph_json: dict[str, Any], n: int = 5) -> list[tuple[float, list[dict]]]:
    """For each of the n input tokens whose paths move the target logit most, its path of largest effect: what
    it adds to the logit through those features alone, in the frozen (linear) model. An edge s -> t is
    a_s·∂t/∂a_s, and an active feature's activation moves with its pre-activation one for one, so a path's
    effect is its first edge times each later edge divided by its source feature's activation:
    w(tok→f1)·w(f1→f2)/a_f1·…·w(fk→logit)/a_fk. Found exactly over the graph (a DAG), by magnitude. One path per
    token, so a prompt-specific path is not hidden behind variants of one through an attention-sink position.
    Best first; the score is the effect's magnitude in logit units."""
    nodes = {node["node_id"]: node for node in graph_json["nodes"]}
    out: dict[str, list[tuple[str, float]]] = {}
    for link in graph_json["links"]:
        out.setdefault(link["source"], []).append((link["target"], link["weight"]))
    target = next(node["node_id"] for node in graph_json["nodes"] if node.get("is_target_logit"))
    best: dict[str, tuple[float, str | None]] = {target: (1.0, None)}  # node -> (effect to the target, next node)

    def per_unit(node: str) -> float:
        """What an edge's weight is divided by to be a derivative: a feature's activation (1 for tokens)."""
        activation = nodes[node].get("activation") if nodes[node]["feature_type"] == "cross layer transcoder" else 1.0
        return abs(activation) if activation else 1.0

    def score(node: str) -> float:
        if node not in best:
            best[node] = max(
                ((abs(w) / per_unit(node) * score(t), t) for t, w in out.get(node, [])), default=(0.0, None)
            )
        return best[node][0]

    starts = sorted(
        (node_id for node_id, node in nodes.items() if node["feature_type"] == "embedding"), key=score, reverse=True
    )
    paths = []
    for start in starts[:n]:
        if score(start) <= 0:
            break
        path = [start]
        while path[-1] != target:
            path.append(best[path[-1]][1])
        paths.append((score(start), [nodes[i] for i in path]))
    return paths


# ---- the set as a whole: every MLP replaced at once -------------------------------------------------------------
@torch.no_grad()
def replacement_scores(
    model: HostModel, transcoders: TranscoderSet, data: Any, tokens: int = 4096, batch_size: int = 8
) -> dict[str, Any]:
    """How well the set stands in for the MLPs, on held-out text: per layer the FVU of its output, and the
    CE-loss score with every transcoder layer's MLP replaced at once (each reading the replaced model's own
    activations, so errors compound): (CE with those MLPs zeroed − CE replaced) / (CE zeroed − CE clean)."""
    from nanosae.data.corpus import iter_documents
    from nanosae.data.tokens import token_batches

    ce = {"clean": 0.0, "replaced": 0.0, "zeroed": 0.0}
    err = {L: 0.0 for L in transcoders}
    sum_sq: dict[int, float] = {L: 0.0 for L in transcoders}  # Σ|y|² of each layer's MLP output
    sum_y: dict[int, Tensor] = {}  # Σy
    count: dict[int, int] = {L: 0 for L in transcoders}
    n_pred = n_tok = 0
    names = [h for L in transcoders for h in transcoders.hooks(L)]
    for batch in token_batches(iter_documents(data), model.tokenizer, data.context_size, batch_size):
        toks, valid = model.as_tokens(batch.tokens), batch.valid.to(model.device)
        keep = valid[:, :-1] & valid[:, 1:]
        target = toks[:, 1:][keep]

        def ce_of(logits: Tensor) -> float:
            return float(torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), target, reduction="sum"))

        logits, cache = model.run_with_cache(toks, names)
        ce["clean"] += ce_of(logits)
        codes = {L: tc.encode(cache[tc.cfg.hook_name][valid]) for L, tc in transcoders.items()}
        for L in transcoders.layers:
            x, y = (cache[h][valid] for h in transcoders.hooks(L))
            err[L] += float((transcoders.output(L, codes, x) - y).pow(2).sum())
            sum_sq[L] += float(y.pow(2).sum())
            sum_y[L] = y.sum(0) if L not in sum_y else sum_y[L] + y.sum(0)
            count[L] += len(y)
        seen: dict[int, Tensor] = {}
        z: dict[int, Tensor] = {}  # each layer's latents from the replaced model's own MLP input
        replaced: dict[str, Any] = {}
        for L, tc in transcoders.items():
            read, write = transcoders.hooks(L)
            replaced[read] = lambda x, L=L, tc=tc: _remember(seen, z, L, x, tc)
            replaced[write] = lambda y, L=L: transcoders.output(L, z, seen[L]).to(y.dtype)
        with model.hooks(replaced):
            ce["replaced"] += ce_of(model.forward(toks))
        with model.hooks({transcoders.hooks(L)[1]: torch.zeros_like for L in transcoders}):
            ce["zeroed"] += ce_of(model.forward(toks))
        n_pred += int(keep.sum())
        n_tok += int(valid.sum())
        if n_tok >= tokens:
            break
    if n_pred == 0:
        raise ConfigError("no text to score the transcoders on (the data gave no tokens)")
    ce = {k: v / n_pred for k, v in ce.items()}
    fvu = {L: err[L] / max(sum_sq[L] - float(sum_y[L].pow(2).sum()) / count[L], 1e-12) for L in sum_sq}
    score = (ce["zeroed"] - ce["replaced"]) / max(ce["zeroed"] - ce["clean"], 1e-12)
    return {
        "tokens": n_tok,
        "fvu_by_layer": {str(L): v for L, v in fvu.items()},
        "ce_loss_clean": ce["clean"],
        "ce_loss_replaced": ce["replaced"],
        "ce_loss_mlps_zeroed": ce["zeroed"],
        "replacement_ce_score": score,
    }


def _remember(seen: dict[int, Tensor], z: dict[int, Tensor], layer: int, x: Tensor, tc: SAE) -> None:
    """A read hook: keep the MLP input and its latents (None: the activation is left as it is)."""
    seen[layer], z[layer] = x, tc.encode(x)


# ---- interventions: set or scale features, see what the model does -------------------------------------------
def node_key(node_id: str) -> tuple[int, int, int]:
    """(layer, latent, position) of a feature node id 'LAYER_LATENT_POS' (ValueError for anything else)."""
    layer, latent, pos = (int(v) for v in node_id.split("_"))
    return layer, latent, pos


def parse_node_edit(text: str) -> tuple[tuple[int, int, int], str, float]:
    """'LAYER_LATENT_POS=V' sets a feature (a graph's node id), 'LAYER_LATENT_POS*F' scales it."""
    for op in ("=", "*"):
        if op in text:
            node, value = text.split(op, 1)
            try:
                key, number = node_key(node), float(value)
            except ValueError:
                break
            if not math.isfinite(number):
                raise ConfigError(f"feature edit {text[:60]!r}: the value must be a finite number")
            return key, op, number
    raise ConfigError(
        f"cannot read feature edit {text!r}; expected LAYER_LATENT_POS=VALUE or LAYER_LATENT_POS*FACTOR "
        f"(a graph node id, e.g. 12_345_5=0)"
    )


@contextlib.contextmanager
def feature_edits(
    model: HostModel,
    transcoders: TranscoderSet,
    tokens: Tensor,
    edits: list[tuple[tuple[int, int, int], str, float]],
    freeze_attention: bool = False,
    constrained: Sequence[int] = (),
) -> Iterator[dict[tuple[int, int, int], float]]:
    """Inside: each edited feature's activation at its prompt position is set (=) or scaled (*) by adding the
    change times its decoder direction to that layer's MLP output (and, cross-layer, each later MLP output it
    writes to), the transcoder's error kept, as a splice with its error term; the change is from its activation
    as the edited model computes it, so earlier edits' effects count. Yields the activations before the edits.

    As circuit-tracer's feature_intervention: freeze_attention keeps the clean run's attention patterns; the
    `constrained` layers also keep their clean MLP outputs (plus the change of a skip term), their features' edits
    taken from the clean activations, so effects pass through attention and the residual stream only; with every
    layer constrained the norm scales are kept too, and the change in a logit is the graph's direct edge."""
    T = tokens.shape[1]
    constrained = sorted(set(constrained))
    pins = Pins() if freeze_attention or constrained else None
    everything = bool(constrained) and set(range(model.n_layers)) <= set(constrained)
    with pinned(model, pins, norms=everything) if pins is not None else contextlib.nullcontext():
        names = [h for layer in transcoders for h in transcoders.hooks(layer)]
        names += [mlp_hooks(L)[1] for L in constrained if L not in transcoders]
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names)
            clean_x = {L: cache[transcoders.hooks(L)[0]][0] for L in transcoders}
            clean = {L: tc.encode(clean_x[L]) for L, tc in transcoders.items()}
        if pins is not None:
            pins.recording = False
        clean_y = {L: cache[transcoders.hooks(L)[1] if L in transcoders else mlp_hooks(L)[1]] for L in constrained}
        before: dict[tuple[int, int, int], float] = {}
        by_layer: dict[int, list[tuple[int, int, str, float]]] = {}
        for (layer, latent, pos), op, value in edits:
            if layer not in transcoders:
                raise ConfigError(f"no transcoder at layer {layer} (the set has {transcoders.layers})")
            if not (0 <= latent < transcoders[layer].cfg.d_sae and 0 <= pos < T):
                raise ConfigError(
                    f"feature {layer}_{latent}_{pos} is out of range "
                    f"(d_sae {transcoders[layer].cfg.d_sae}, {T} positions)"
                )
            before[(layer, latent, pos)] = float(clean[layer][pos, latent])
            by_layer.setdefault(layer, []).append((pos, latent, op, value))
        seen: dict[int, Tensor] = {}
        pending: dict[int, Tensor] = {}

        def read(layer: int) -> Any:
            def fn(x: Tensor) -> None:
                seen[layer] = x

            return fn

        def write(layer: int) -> Any:
            def fn(y: Tensor) -> Tensor:
                if y.shape[1] < T:  # a generated token's step: the prompt's edits are in the KV cache
                    return y
                if layer in by_layer:  # this layer's edits, from its activations as they are now (or clean)
                    tc = transcoders[layer]
                    now = clean[layer] if layer in constrained else tc.encode(seen[layer][0])
                    for pos, latent, op, value in by_layer[layer]:
                        old = float(now[pos, latent])
                        change = (value if op == "=" else old * value) - old
                        for target in transcoders.targets(layer):
                            rows = transcoders.rows(layer, target, torch.tensor(latent)).detach()
                            pending.setdefault(target, torch.zeros_like(y[0]))[pos] += (rows * change).to(y.dtype)
                if layer in constrained:
                    y = clean_y[layer].clone()
                    if layer in transcoders:
                        tc = transcoders[layer]
                        skip = skip_term(tc, seen[layer][0]) - skip_term(tc, clean_x[layer])
                        y = y + (skip if isinstance(skip, Tensor) else 0.0)
                return y + pending.pop(layer) if layer in pending else y

            return fn

        hooks = {transcoders.hooks(L)[0]: read(L) for L in set(by_layer) | (set(constrained) & set(transcoders))}
        written = set(constrained) | {t for L in by_layer for t in transcoders.targets(L)}
        hooks |= {(transcoders.hooks(L)[1] if L in transcoders else mlp_hooks(L)[1]): write(L) for L in written}
        with torch.no_grad(), model.hooks(hooks):
            yield before


def intervene(
    model: HostModel,
    transcoders: TranscoderSet,
    prompt: str | list[int],
    edits: list[tuple[tuple[int, int, int], str, float]],
    max_new_tokens: int = 20,
    top: int = 5,
    freeze_attention: bool = False,
    constrained: Sequence[int] = (),
) -> dict[str, Any]:
    """Top next-token probabilities and a greedy continuation, without and with the feature edits, and the `top`
    other features whose activation on the prompt the edits moved most (node id, before, after). By default the
    model runs as it is (attention and MLPs recomputed), so what the edits change downstream shows;
    freeze_attention and constrained as in feature_edits."""
    tokens = model.prompt_ids(prompt)
    ids = torch.tensor([tokens])

    def run() -> dict[str, Any]:
        probs = model.forward(ids)[0, -1].float().softmax(-1)
        p, t = probs.topk(min(top, len(probs)))
        gen = model.generate(tokens, max_new_tokens=max_new_tokens, temperature=0.0, stop_at_eos=False)
        return {"top": [(model.tokenizer.decode([int(i)]), float(v)) for v, i in zip(p, t)], "continuation": gen.text}

    original = run()
    clean = latents_on(model, transcoders, ids)
    with feature_edits(model, transcoders, ids, edits, freeze_attention, constrained) as before:
        edited = run()
        after = latents_on(model, transcoders, ids)
    changed = []  # every other feature whose activation on the prompt moved, by how much
    for layer in transcoders.layers:
        delta = (after[layer] - clean[layer]).abs()
        for pos, latent in (delta > 1e-6).nonzero().tolist():
            if (layer, latent, pos) not in before:
                changed.append((float(delta[pos, latent]), layer, latent, pos))
    changed.sort(reverse=True)
    return {
        "original": original,
        "edited": edited,
        "activations_before": {f"{layer}_{f}_{p}": v for (layer, f, p), v in before.items()},
        "downstream": [
            (f"{layer}_{latent}_{pos}", float(clean[layer][pos, latent]), float(after[layer][pos, latent]))
            for _, layer, latent, pos in changed[:top]
        ],
    }


@torch.no_grad()
def latents_on(model: HostModel, transcoders: TranscoderSet, ids: Tensor) -> dict[int, Tensor]:
    """Each transcoder layer's latents (T, d_sae) on the prompt, as the model (with any hooks active) runs it."""
    reads = {transcoders.hooks(L)[0]: L for L in transcoders}
    _, cache = model.run_with_cache(ids, list(reads), return_logits=False)
    return {L: transcoders[L].encode(cache[hook][0]) for hook, L in reads.items()}


def read_json_graph(path: str | Path) -> dict[str, Any]:
    """A graph file, checked for the layout to_neuronpedia writes (one-line FormatError naming the file)."""
    data = read_json(path)
    if not {"metadata", "qParams", "nodes", "links"} <= set(data) or not isinstance(data["nodes"], list):
        raise FormatError(f"{path}: not an attribution graph (expected metadata, qParams, nodes, links)")
    if (
        not isinstance(data["metadata"], dict)
        or not isinstance(data["qParams"], dict)
        or not isinstance(data["links"], list)
    ):
        raise FormatError(f"{path}: metadata and qParams must be objects, links a list")
    for i, node in enumerate(data["nodes"]):
        if not (
            isinstance(node, dict)
            and isinstance(node.get("node_id"), str)
            and isinstance(node.get("feature_type"), str)
        ):
            raise FormatError(f"{path}: node {i} needs a node_id and a feature_type (text)")
        if node["feature_type"] == "cross layer transcoder":
            try:
                node_key(node["node_id"])
            except ValueError:
                raise FormatError(f"{path}: node {i}'s id {node['node_id'][:40]!r} is not LAYER_LATENT_POS") from None
    for i, link in enumerate(data["links"]):
        if not (
            isinstance(link, dict)
            and isinstance(link.get("source"), str)
            and isinstance(link.get("target"), str)
            and isinstance(link.get("weight"), (int, float))
            and not isinstance(link.get("weight"), bool)
        ):
            raise FormatError(f"{path}: link {i} needs a source, a target (node ids) and a numeric weight")
    return data


# ---- the unpruned graph, kept so it can be pruned again without tracing again --------------------------------
def graph_tensors_path(graph_file: str | Path) -> Path:
    """Where the unpruned graph of a graph file lives: beside it, NAME.safetensors."""
    return Path(graph_file).with_suffix(".safetensors")


def save_graph(graph: Graph, path: str | Path) -> Path:
    """The whole graph (every traced node and edge) as safetensors, its text fields in the metadata."""
    from safetensors.torch import save_file

    from nanosae.io import atomic_write

    tensors = {
        "adjacency": graph.adjacency.float().contiguous(),
        "features": graph.features.long().contiguous(),
        "activations": graph.activations.float().contiguous(),
        "explored": graph.explored.contiguous(),
        "logit_probs": torch.tensor(graph.logit_probs, dtype=torch.float64),
    }
    meta = {
        "prompt": graph.prompt,
        "tokens": graph.tokens,
        "token_strs": graph.token_strs,
        "layers": graph.layers,
        "logit_tokens": graph.logit_tokens,
        "model": graph.model,
        "transcoders": graph.transcoders,
        "info": {k: v for k, v in graph.info.items() if k != "logit_strs"}
        | {"logit_strs": {str(t): s for t, s in graph.info.get("logit_strs", {}).items()}},
    }
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"graph": json.dumps(meta)}))


def load_graph(path: str | Path) -> Graph:
    """A graph save_graph wrote (FormatError naming the file when it is not one)."""
    from safetensors import safe_open

    from nanosae.errors import first_line
    from nanosae.io import regular_file

    try:
        with safe_open(str(regular_file(path)), "pt") as f:
            meta = json.loads((f.metadata() or {})["graph"])
            t = {k: f.get_tensor(k) for k in ("adjacency", "features", "activations", "explored", "logit_probs")}
        n_nodes = len(t["features"]) + (len(meta["layers"]) + 1) * len(meta["tokens"]) + len(meta["logit_tokens"])
        if t["adjacency"].shape != (n_nodes, n_nodes) or t["features"].shape != (len(t["features"]), 3):
            raise ValueError(f"adjacency of shape {tuple(t['adjacency'].shape)} for {n_nodes} nodes")
        graph = Graph(
            meta["prompt"],
            meta["tokens"],
            meta["token_strs"],
            meta["layers"],
            t["features"],
            t["activations"],
            meta["logit_tokens"],
            t["logit_probs"].tolist(),
            t["adjacency"],
            t["explored"],
            model=meta["model"],
            transcoders=meta["transcoders"],
            info=meta["info"],
        )
    except FormatError:
        raise
    except Exception as e:  # not safetensors, no graph metadata, fields missing or of the wrong kind
        raise FormatError(f"{path}: not an unpruned graph from `nanosae trace` ({first_line(e)})") from None
    graph.info["logit_strs"] = {int(k): v for k, v in graph.info.get("logit_strs", {}).items()}
    return graph
