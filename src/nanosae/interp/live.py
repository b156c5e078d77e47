"""Features while the model runs: live tracking during generation, and steering (add / clamp / ablate).

Tracking: a hook at each SAE's hook point keeps the activation of the newest position. A token's own
latents exist only once the model has read it, one step after it was sampled, so each token is reported
when the next forward pass has run (the last one after an extra cached step): the latents shown beside a
token are those of its position, as in features.db and the viewer. Encoding one position is one
d_in × d_sae product per token next to the model's ~10^8, so tracking costs almost nothing.

Steering, per latent i of an SAE at its hook:
  add    x + v · W_dec[i] / activation_scale     (v in latent-activation units, every position)
  clamp  the SAE spliced in with its error term, z_i set to v: x + decode(z with z_i = v) − decode(z),
         i.e. x + (v − z_i) · W_dec[i] in model units; everything else about x is left exactly as it was
  ablate clamp to 0
A transcoder is edited where it writes (its output hook, with z read from its input hook); a crosscoder
adds each layer's part of W_dec[i] to that layer (clamping it would need every layer at once: it is acausal).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from nanosae.errors import ConfigError
from nanosae.models import Generation, HostModel
from nanosae.models.host import HookFn
from nanosae.sae import SAE


class ActiveFeature(NamedTuple):
    sae: str
    latent: int
    activation: float
    label: str | None


class TrackedToken(NamedTuple):
    step: int
    token: int
    text: str
    features: list[ActiveFeature]


class FeatureTracker:
    """Streams the top-k active features of every generated token (several SAEs at once)."""

    def __init__(
        self,
        model: HostModel,
        saes: dict[str, SAE],
        top_k: int = 5,
        labels: dict[tuple[str, int], str] | None = None,
        hidden: dict[str, set[int]] | None = None,
    ):
        """hidden: per SAE, latents left out of the top features (the dense ones: they fire on most tokens and
        would fill every list)."""
        self.model, self.saes, self.top_k, self.labels = model, saes, top_k, labels or {}
        self.hidden = {name: sorted(ids) for name, ids in (hidden or {}).items() if ids}
        for sae in saes.values():
            if not sae.cfg.hook_name:
                raise ConfigError("every tracked SAE needs cfg.hook_name")
            for hook in sae.cfg.input_hooks:
                model.parse_hook(hook)
            sae.eval()
        self.latest: dict[str, Tensor] = {}
        self.history: list[TrackedToken] = []

    def _capture(self, hook: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            self.latest[hook] = x[0, -1].detach()

        return fn

    @torch.no_grad()
    def features_now(self) -> list[ActiveFeature]:
        out = []
        for name, sae in self.saes.items():
            z = sae.encode(sae.gather_input(self.latest)[None])[0]
            if name in self.hidden:
                z = z.index_fill(0, torch.tensor(self.hidden[name], device=z.device), 0.0)
            vals, idx = z.topk(min(self.top_k, len(z)))
            out += [
                ActiveFeature(name, int(i), float(v), self.labels.get((name, int(i))))
                for v, i in zip(vals, idx)
                if v > 0
            ]
        return out

    def generate(
        self, prompt: str | list[int], callback: Callable[[TrackedToken], None] | None = None, **generate_kwargs
    ) -> Generation:
        """model.generate with tracking; callback(TrackedToken) as each token appears."""
        hooks = {h: self._capture(h) for sae in self.saes.values() for h in sae.cfg.input_hooks}

        pending: list[tuple[int, int]] = []  # the sampled token the model has not read yet

        def report() -> None:
            step, token = pending.pop()
            tracked = TrackedToken(step, token, self.model.tokenizer.decode([token]), self.features_now())
            self.history.append(tracked)
            if callback is not None:
                callback(tracked)

        def on_token(step: int, token: int) -> None:
            if pending:  # the forward pass just run read the previous token: its latents are the newest
                report()
            pending.append((step, token))

        with self.model.hooks(hooks):
            generation = self.model.generate(prompt, callback=on_token, feed_last=True, **generate_kwargs)
        if pending:
            report()
        return generation

    def summary(self, n: int = 10) -> list[tuple[ActiveFeature, int]]:
        """The features active on the most generated tokens (with their largest activation)."""
        counts: Counter = Counter()
        best: dict[tuple[str, int], ActiveFeature] = {}
        for t in self.history:
            for f in t.features:
                key = (f.sae, f.latent)
                counts[key] += 1
                if key not in best or f.activation > best[key].activation:
                    best[key] = f
        return [(best[key], c) for key, c in counts.most_common(n)]


# ---- steering ---------------------------------------------------------------------------------------
MAX_EDIT = 1e4  # far beyond any latent's activation; larger values only overflow the model into NaN


@dataclass
class Edit:
    """Add value·W_dec[latent] where the SAE writes (mode add), or hold the latent at value (mode clamp)."""

    latent: int
    value: float
    mode: str = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.latent, int) or isinstance(self.latent, bool) or self.latent < 0:
            raise ConfigError(f"feature edit: latent must be a non-negative integer, got {self.latent!r}")
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, (int, float))
            or not math.isfinite(self.value)
            or abs(self.value) > MAX_EDIT
        ):
            raise ConfigError(f"feature edit: value must be a finite number within ±{MAX_EDIT:g}, got {self.value!r}")
        if self.mode not in ("add", "clamp"):
            raise ConfigError(f"feature edit: mode must be add or clamp, got {self.mode!r}")
        self.value = float(self.value)


def parse_edit(text: str) -> Edit:
    """'123=+8' adds 8·W_dec[123]; '123=-4' subtracts; '77=5' clamps to 5; '77=0' ablates."""
    m = re.fullmatch(r"\s*(\d+)\s*=\s*([+-]?)(\d*\.?\d+(?:e[+-]?\d+)?)\s*", text)
    if not m:
        raise ConfigError(
            f"cannot read feature edit {text!r}; expected LATENT=+V (add), LATENT=-V (subtract) or LATENT=V (clamp)"
        )
    value = float(m.group(3)) * (-1 if m.group(2) == "-" else 1)
    return Edit(int(m.group(1)), value, "add" if m.group(2) else "clamp")


@contextmanager
def steering(model: HostModel, sae: SAE, edits: list[Edit]) -> Iterator[None]:
    """Apply the edits where the SAE writes (its hook; a transcoder's output hook) while the context is open."""
    for e in edits:
        if not 0 <= e.latent < sae.cfg.d_sae:
            raise ConfigError(f"feature {e.latent} is out of range (the SAE has latents 0..{sae.cfg.d_sae - 1})")
    adds = [e for e in edits if e.mode == "add"]
    clamps = [e for e in edits if e.mode == "clamp"]
    if clamps and sae.cfg.kind == "crosscoder":
        raise ConfigError(
            "a crosscoder's latents depend on every layer at once, so they cannot be clamped during a "
            "forward pass; add its decoder direction instead (LATENT=+V)"
        )
    direction = sum(
        (e.value * sae.W_dec[e.latent] for e in adds), torch.zeros(sae.cfg.d_out, dtype=sae.dtype, device=sae.device)
    )
    blocks = sae.output_blocks((direction / sae.output_factor()).detach())
    if sae.cfg.crosscoder_models:  # a diff: at the one hook, what B writes for the latent minus what A writes
        from nanosae.interp.diff import decoders

        dec_a, dec_b = decoders(sae, scaled=False)  # in the models' units
        toward_b = sum((e.value * (dec_b[e.latent] - dec_a[e.latent]) for e in adds), torch.zeros(dec_a.shape[1]))
        blocks = {sae.cfg.hook_name: toward_b.to(sae.device)}
    read_at = sae.cfg.hook_name if sae.cfg.kind == "transcoder" else None
    captured: dict[str, Tensor] = {}

    def clamped(y: Tensor) -> Tensor:
        """y plus the change in the SAE's output when the clamped latents are set (the error term kept)."""
        z, norm = sae.encode(captured["x"] if read_at else y, return_norm=True)
        z_set = z.clone()
        for e in clamps:
            z_set[..., e.latent] = e.value
        return y + (sae.decode(z_set, norm) - sae.decode(z, norm)).to(y.dtype)

    def write(hook: str) -> Callable[[Tensor], Tensor]:
        def fn(y: Tensor) -> Tensor:
            y = clamped(y) if clamps else y
            return y + blocks[hook].to(y.dtype) if adds else y

        return fn

    fns: dict[str, HookFn] = {h: write(h) for h in dict.fromkeys(sae.cfg.output_hooks)}
    if read_at and clamps:
        fns[read_at] = lambda x: captured.__setitem__("x", x)
    with model.hooks(fns):
        yield


def steer(
    model: HostModel, sae: SAE, edits: list[Edit], prompt: str | list[int], **generate_kwargs
) -> tuple[Generation, Generation]:
    """(baseline, steered) generations with the same seed and settings."""
    baseline = model.generate(prompt, **generate_kwargs)
    with torch.no_grad(), steering(model, sae, edits):
        steered = model.generate(prompt, **generate_kwargs)
    return baseline, steered


@torch.no_grad()
def next_token_probability(model: HostModel, sae: SAE, edits: list[Edit], prompt: str, token_ids: list[int]) -> float:
    """The probability mass the model puts on token_ids right after the prompt, with the edits applied: how
    a steering edit is measured, not only read."""
    ids = torch.tensor([model.prompt_ids(prompt)])
    with steering(model, sae, edits):
        logits = model.forward(ids)[0, -1].float()
    return float(logits.softmax(-1)[token_ids].sum())
