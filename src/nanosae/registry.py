"""What an SAE architecture is, and the one table of them.

Every place that behaves differently per architecture (the SAE's parameters and activation, the training
loss, dead-latent handling, derived defaults, exports, which fast paths apply) asks this table, so a new
architecture is one `register(Architecture(...))` call: nanosae.sae.architectures registers the built-in
ones, and a user's own file can register another (tests/sae/test_registry.py trains a toy one end to end).

The table lives below the configs (which check names against it); the built-in entries live with the SAE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from nanosae.errors import ConfigError

DEFAULT_ARCHITECTURE = "topk"


class LossInputs(NamedTuple):
    """What an architecture's loss terms may look at, for one batch (all in the SAE's normalised space)."""

    x_norm: Tensor
    y: Tensor  # the target: x_norm, or a transcoder's normalised target
    pre: Tensor  # pre-activations (B, d_sae)
    z: Tensor  # latents (B, d_sae)
    x_hat: Tensor  # reconstruction, with grad
    skip: Tensor | float  # a skip transcoder's skip term (0.0 without)
    added: Tensor | None  # a prediction from elsewhere added to this SAE's (cross-layer transcoders)
    weights: Tensor | None  # per-token weights of the squared error (norm_weighting)
    coefficient: float  # the sparsity coefficient at this step (warmed up)


@dataclass(frozen=True)
class Architecture:
    """One architecture: how latents come from pre-activations, what the loss adds, and what it can do."""

    name: str
    activate: Callable[..., Tensor]
    """(sae, pre, x_norm, k) -> latents in training; k is this step's k (annealed) for the TopK family."""
    infer: Callable[..., Tensor] | None = None
    """(sae, pre, x_norm) -> latents at inference; None: `activate` with the SAE's own k."""
    loss_terms: Callable[[Any, LossInputs], dict[str, Tensor]] | None = None
    """(sae, inputs) -> the loss's terms besides the reconstruction error (penalties, auxiliary losses)."""
    parameters: Callable[[int, Any], dict[str, Tensor]] | None = None
    """(d_sae, dtype) -> the encoder's per-latent parameters; None: one bias b_enc."""
    buffers: Callable[[int, Any], dict[str, Tensor]] | None = None
    """(d_sae, dtype) -> state kept with the weights that training does not step (BatchTopK's threshold)."""
    pre_acts: Callable[[Any, Tensor], Tensor] | None = None
    """(sae, x_centred) -> pre-activations; None: x W_enc + b_enc."""
    after_step: Callable[[Any], None] | None = None
    """(sae) -> None, after each optimizer step (JumpReLU keeps its thresholds ≥ 0)."""
    sparse: Callable[..., tuple[Any, Any]] | None = None
    """(sae, x_centred, k, dead, k_aux, gemm_dtype) -> (Selection, AuxK Selection or None): the sparse kernels'
    training path (no (B, d_sae) latents); None: the dense path."""
    selection: str | None = None
    """The TopK family: "token" (k per token) or "batch" (k·B per batch in training, a calibrated threshold at
    inference); None for architectures without k."""
    nested: bool = False
    """Matryoshka: the loss also reconstructs from nested prefixes of the latents (SAEConfig.matryoshka_groups)."""
    dead_latents: str | None = None
    """What training does for latents that stopped firing: "auxk" (Gao et al.), "resample" or None."""
    sparsity_coefficient: float = 0.0
    """Default weight of the sparsity penalty in loss_terms (the L1 or L0 coefficient)."""
    decoder_lr_scale: float = 1.0
    """Default decoder learning rate as a multiple of the encoder's."""
    saelens: str = ""
    """The architecture SAELens runs it as ("" = its own name); the batch forms run as jumprelu."""
    saelens_transcoder: bool = True
    """Whether SAELens has a transcoder of this architecture."""

    @property
    def uses_k(self) -> bool:
        """The TopK family: k latents per token (on average, for the batch forms)."""
        return self.selection is not None

    @property
    def saelens_name(self) -> str:
        return self.saelens or self.name


_TABLE: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the table (a name registered twice must be the same entry)."""
    if arch.name in _TABLE and _TABLE[arch.name] is not arch:
        raise ConfigError(f"architecture {arch.name!r} is already registered")
    _TABLE[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    """The architecture called name, or a one-line error listing the known ones."""
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown SAE architecture {name!r}; expected one of {', '.join(names())}") from None


def names() -> list[str]:
    return list(_TABLE)


def sparse_names() -> list[str]:
    """The architectures trained on the sparse kernels (what cross-layer transcoders and the refit need)."""
    return [name for name, arch in _TABLE.items() if arch.sparse is not None]
