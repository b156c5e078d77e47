"""One host-model interface over any decoder stack: TransformerLens hook names on PyTorch module hooks.

Every back end (Hugging Face, our nanochat implementation, a wrapped live module) only has to say, per
layer, which modules are the block, its attention, its MLP and the MLP's down projection:
  blocks.L.hook_resid_pre   input of the block            blocks.L.hook_attn_out  output of attention
  blocks.L.hook_resid_mid   block input + attention out   blocks.L.hook_mlp_out   output of the MLP
  blocks.L.hook_resid_post  output of the block           blocks.L.mlp.hook_post  input of the down projection
  blocks.L.ln2.hook_normalized  input of the MLP (after its norm): what transcoders usually read
Editing resid_mid is done by rewriting the attention output (new_mid - resid_pre), so the residual
stream itself changes, not just the MLP's view of it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from nanosae.config import GenerationConfig
from nanosae.errors import HookError
from nanosae.models.tokenizers import Tokenizer

HOOK_KINDS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "ln2.hook_normalized",
)
HookFn = Callable[[Tensor], "Tensor | None"]


@dataclass
class LayerModules:
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    mlp_down: nn.Module
    attn_out: nn.Module | None = None
    """The module whose output the block adds to the residual after attention (Gemma-2's sandwich norm:
    post_attention_layernorm); None: the attention itself."""
    mlp_out: nn.Module | None = None
    """Likewise after the MLP (Gemma-2: post_feedforward_layernorm); None: the MLP itself."""


class Generation(NamedTuple):
    text: str
    tokens: list[int]
    prompt_tokens: list[int]


class StopForward(Exception):
    """Raised from a hook to end a truncated forward pass after the last block needed."""


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


class HostModel:
    """A language model with hook points. Back ends fill in the attributes and the three _methods."""

    name: str
    module: nn.Module
    tokenizer: Tokenizer
    layers: list[LayerModules]
    d_model: int
    d_mlp: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of the first floating-point weight)."""
        return next(p.dtype for p in self.module.parameters() if p.is_floating_point())

    # ---- back-end specifics -----------------------------------------------------------------
    def _logits(self, tokens: Tensor) -> Tensor:
        """Full forward pass: tokens (B, T) -> logits (B, T, vocab)."""
        raise NotImplementedError

    def unembed(self) -> tuple[Any, Tensor]:
        """The final norm (a module or function) and W_U (d_model, vocab), for logit effects of directions."""
        raise NotImplementedError

    def _new_cache(self) -> Any:
        return None

    def _logits_cached(self, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """Forward of new tokens given a KV cache; default recomputes (no cache)."""
        prefix = tokens if cache is None else torch.cat([cache, tokens], dim=1)
        return self._logits(prefix)[:, -tokens.shape[1] :], prefix

    # ---- hook names -------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.{kind}" for layer in range(self.n_layers) for kind in HOOK_KINDS]

    def parse_hook(self, name: str) -> tuple[int, str]:
        """'blocks.6.hook_resid_post' -> (6, 'hook_resid_post'); unknown names list near matches."""
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match and match.group(2) in HOOK_KINDS:
            layer = int(match.group(1))
            if layer < self.n_layers:
                return layer, match.group(2)
            raise HookError(f"hook {name!r}: layer {layer} is out of range (model has layers 0..{self.n_layers - 1})")
        near = difflib.get_close_matches(name, self.hook_names(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(near)}?" if near else f"valid names are blocks.L.{{{', '.join(HOOK_KINDS)}}}"
        raise HookError(f"unknown hook name {name!r}; {hint}")

    def hook_dim(self, name: str) -> int:
        return self.d_mlp if self.parse_hook(name)[1] == "mlp.hook_post" else self.d_model

    # ---- hooks ------------------------------------------------------------------------------
    @contextmanager
    def hooks(self, fns: Mapping[str, HookFn], stop_at_layer: int | None = None) -> Iterator[None]:
        """Read or replace activations: fn(tensor) returns a new tensor or None. Always removed after.

        stop_at_layer=N ends the forward pass after block N-1 (TransformerLens convention).
        """
        handles = []
        try:
            for name, fn in fns.items():
                layer, kind = self.parse_hook(name)
                handles.extend(self._register(self.layers[layer], kind, fn))
            if stop_at_layer is not None and stop_at_layer < self.n_layers:

                def stop(module, args, output):
                    raise StopForward

                handles.append(self.layers[max(stop_at_layer - 1, 0)].block.register_forward_hook(stop))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _register(mods: LayerModules, kind: str, fn: HookFn) -> list[Any]:
        if kind == "hook_resid_pre":

            def pre_hook(module, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return [mods.block.register_forward_pre_hook(pre_hook, with_kwargs=True)]
        if kind in ("hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            module = {
                "hook_resid_post": mods.block,
                "hook_attn_out": mods.attn_out or mods.attn,
                "hook_mlp_out": mods.mlp_out or mods.mlp,
            }[kind]

            def out_hook(module, args, output):
                new = fn(_first(output))
                return None if new is None else _replace_first(output, new)

            return [module.register_forward_hook(out_hook)]
        if kind in ("mlp.hook_post", "ln2.hook_normalized"):

            def input_hook(module, args):
                new = fn(args[0])
                return None if new is None else (new, *args[1:])

            return [(mods.mlp_down if kind == "mlp.hook_post" else mods.mlp).register_forward_pre_hook(input_hook)]
        # hook_resid_mid: block input + attention output, edited through the attention output
        seen: dict[str, Tensor] = {}

        def remember(module, args, kwargs):
            seen["pre"] = args[0] if args else kwargs["hidden_states"]

        def mid_hook(module, args, output):
            pre = seen.pop("pre")
            attn_out = _first(output)
            new = fn(pre + attn_out)
            return None if new is None else _replace_first(output, new - pre)

        return [
            mods.block.register_forward_pre_hook(remember, with_kwargs=True),
            (mods.attn_out or mods.attn).register_forward_hook(mid_hook),
        ]

    # ---- reusing a clean pass's prefix --------------------------------------------------------
    def unchanged_blocks(self, names: list[str]) -> int:
        """How many leading blocks compute the same outputs when activations at names are edited."""
        return min(
            (layer + 1 if kind == "hook_resid_post" else layer for layer, kind in map(self.parse_hook, names)),
            default=0,
        )

    @contextmanager
    def recording_blocks(self, n: int) -> Iterator[list[Any]]:
        """Collect the outputs of blocks 0..n-1 during the passes inside (for replaying_blocks)."""
        outputs: list[Any] = []
        handles = [self.layers[i].block.register_forward_hook(lambda m, a, out: outputs.append(out)) for i in range(n)]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying_blocks(self, outputs: list[Any]) -> Iterator[None]:
        """Blocks 0..len(outputs)-1 return these recorded outputs instead of computing them.

        Evaluation edits one layer and runs the model again; the blocks before it would only recompute the
        clean pass's outputs, so they are replayed (hooks on them still run: an edit at a replayed block's
        output applies as usual). Exact for blocks without side effects, which every back end has."""
        blocks = [self.layers[i].block for i in range(len(outputs))]
        with _forwards_replaced(blocks, [lambda *args, _out=out, **kwargs: _out for out in outputs]):
            yield

    @contextmanager
    def skipping_mlps(self, layers: list[int]) -> Iterator[None]:
        """The MLPs of these layers return zeros without computing (their hooks still run): for passes in which
        a hook at blocks.L.hook_mlp_out replaces the output anyway, such as a replacement model's, where the
        MLPs are most of the cost."""
        mlps = [self.layers[i].mlp for i in layers]
        with _forwards_replaced(mlps, [lambda x, *args, **kwargs: torch.zeros_like(x)] * len(mlps)):
            yield

    # ---- running ----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A text prompt's token ids with BOS first; token ids are taken as they are."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)] if isinstance(prompt, str) else list(prompt)

    def as_tokens(self, tokens: Tensor | list) -> Tensor:
        """Token ids as a (batch, T) long tensor on the model's device (one sequence becomes a batch of one)."""
        t = torch.as_tensor(tokens, dtype=torch.long)
        if t.dim() == 1:
            t = t[None]
        return t.to(self.device)

    @torch.no_grad()
    def forward(self, tokens: Tensor | list) -> Tensor:
        return self._logits(self.as_tokens(tokens))

    def logits(self, tokens: Tensor, last_only: bool = False) -> Tensor:
        """The forward pass with autograd on (forward() runs without it): for gradients through the model.
        last_only: the last position's logits alone, (B, 1, vocab), without the others' (a long prompt's
        full-vocabulary logits at every position are gigabytes)."""
        return self._last_logits(tokens) if last_only else self._logits(tokens)

    def _last_logits(self, tokens: Tensor) -> Tensor:
        return self._logits(tokens)[:, -1:]

    @torch.no_grad()
    def logits_at(self, tokens: Tensor | list, positions: list[int], token_ids: list[int]) -> Tensor:
        """(batch, len(token_ids)) logits of a few tokens at one position per row: what yes/no questions to
        the model need, without the full-vocabulary logits of every position."""
        logits = self.forward(tokens)
        return logits[torch.arange(len(positions)), torch.tensor(positions)][:, token_ids]

    __call__ = forward

    @overload
    def run_with_cache(
        self, tokens: Tensor | list, names: list[str], stop_at_layer: None = None, return_logits: Literal[True] = True
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    @overload
    def run_with_cache(
        self, tokens: Tensor | list, names: list[str], stop_at_layer: int | None = None, return_logits: bool = True
    ) -> tuple[Tensor | None, dict[str, Tensor]]: ...

    @torch.no_grad()
    def run_with_cache(
        self, tokens: Tensor | list, names: list[str], stop_at_layer: int | None = None, return_logits: bool = True
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Logits (None when the pass stopped early) and the activations at names.

        With return_logits=False and no stop_at_layer, the pass stops after the last hooked block.
        """
        cache: dict[str, Tensor] = {}

        def capture(name: str) -> HookFn:
            def fn(x: Tensor) -> None:
                cache[name] = x.detach()

            return fn

        layers = [self.parse_hook(name)[0] for name in names]
        if stop_at_layer is None and not return_logits:
            stop_at_layer = max(layers, default=-1) + 1
        if stop_at_layer is not None and layers and max(layers) >= stop_at_layer:
            raise HookError(f"stop_at_layer={stop_at_layer} ends the pass before block {max(layers)} is reached")
        logits = None
        with self.hooks({name: capture(name) for name in names}, stop_at_layer=stop_at_layer):
            try:
                logits = self._logits(self.as_tokens(tokens))
            except StopForward:
                pass
        return logits, cache

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        chat: bool = False,
        callback: Callable[[int, int], None] | None = None,
        stop_at_eos: bool = True,
        feed_last: bool = False,
    ) -> Generation:
        """Sample a continuation with a KV cache; hooks in force apply at every step.

        temperature 0 is greedy. callback(step, token_id) is called as each token is produced, before the
        model has read it; feed_last also runs the last token through the model, so hooks see every
        generated token at its own position (live tracking needs that).
        """
        GenerationConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, chat=chat
        )  # checks
        ids = self.tokenizer.encode_chat(prompt) if chat and isinstance(prompt, str) else self.prompt_ids(prompt)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        cache = self._new_cache()
        logits, cache = self._logits_cached(self.as_tokens(ids), cache)
        new: list[int] = []
        for step in range(max_new_tokens):
            token = sample(logits[0, -1].float().cpu(), temperature, top_k, generator)
            new.append(token)
            if callback is not None:
                callback(step, token)
            last = (stop_at_eos and token == self.tokenizer.eos_id) or step + 1 == max_new_tokens
            if feed_last or not last:
                logits, cache = self._logits_cached(self.as_tokens([token]), cache)
            if last:
                break
        return Generation(self.tokenizer.decode(new), new, ids)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@contextmanager
def _forwards_replaced(modules: list[nn.Module], forwards: list[Callable[..., Any]]) -> Iterator[None]:
    """Each module's forward replaced by its function while inside (hooks still run), restored after; a forward
    set on the instance before (accelerate sets some) comes back too."""
    saved = [module.__dict__.get("forward") for module in modules]
    try:
        for module, forward in zip(modules, forwards):
            module.forward = forward
        yield
    finally:
        for module, old in zip(modules, saved):
            if old is None:
                del module.forward
            else:
                module.forward = old
