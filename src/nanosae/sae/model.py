"""The sparse autoencoder: one module, five architectures, SAELens parameter names.

Shapes: x (..., d_in), latents z (..., d_sae); W_enc (d_in, d_sae), W_dec (d_sae, d_in).
pre = (x - b_dec) W_enc + b_enc, and z = the architecture's activation of pre (nanosae.sae.architectures:
relu, topk, batchtopk, jumprelu, gated, matryoshka, and whatever else is registered in nanosae.registry).

The same class is also a transcoder and a crosscoder, because both are an SAE with other inputs/outputs:
  transcoder  reads hook_name, predicts hook_name_out (e.g. an MLP's input -> its output): W_dec (d_sae, d_out),
              b_dec in the output space and not subtracted from the input, optional skip x W_skip^T
  crosscoder  reads and reconstructs several hooks at once (acausal): x is their concatenation, one shared
              latent space, the loss sums over layers, and decoder norms are summed per layer (L1 weights)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

import torch
from torch import Tensor, nn

from nanosae import registry
from nanosae.config import TORCH_DTYPES, SAEConfig, check_device
from nanosae.errors import ConfigError, ShapeError
from nanosae.sae import architectures as _builtin  # noqa: F401  (registers the built-in architectures)
from nanosae.sae import formats

LAYER_NORM_EPS = 1e-5  # OpenAI's LN(): (x - mean) / (std + eps), std with N-1
NormState = tuple[Tensor, Tensor]  # layer-norm SAEs: each input's (mean, std), needed to undo the norm on output


def concat_hooks(acts: dict[str, Tensor], hooks: list[str]) -> Tensor:
    """Activations of several hooks side by side (the layout of crosscoder inputs and outputs)."""
    return acts[hooks[0]] if len(hooks) == 1 else torch.cat([acts[h] for h in hooks], dim=-1)


class HookPoint(nn.Identity):
    """A named spot in the forward pass; forward hooks registered on it can read or replace the value."""


class SAE(nn.Module):
    # registered per architecture (nanosae.registry); declared here for readers and type checkers
    b_enc: nn.Parameter
    threshold: Tensor
    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    W_skip: nn.Parameter

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f, d_out, dtype = cfg.d_in, cfg.d_sae, cfg.d_out, TORCH_DTYPES[cfg.dtype]
        W_dec_FD = torch.randn(f, d_out, dtype=torch.float32)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        if cfg.kind == "transcoder":  # input and output are different spaces: no tied transpose
            W_enc_DF = torch.randn(d, f, dtype=torch.float32)
            W_enc_DF /= W_enc_DF.norm(dim=0, keepdim=True)
        else:
            W_enc_DF = W_dec_FD.T
        # (d_in, d_sae) held latent-major in memory, as W_dec is: the sparse backward computes its gradient one
        # latent row at a time, so it lands in the parameter's own layout (no transposed copy of a 600 MB
        # gradient per step at d_sae 65k), and the encoder GEMM reads the transpose for free
        self.W_enc = nn.Parameter(W_enc_DF.T.to(dtype, copy=True, memory_format=torch.contiguous_format).T)
        self.W_dec = nn.Parameter(W_dec_FD.to(dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d, dtype=dtype))
        self.arch = registry.get(cfg.architecture)
        params = self.arch.parameters(f, dtype) if self.arch.parameters else {"b_enc": torch.zeros(f, dtype=dtype)}
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))
        for name, value in (self.arch.buffers(f, dtype) if self.arch.buffers else {}).items():
            self.register_buffer(name, value)
        self.use_error_term = False
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        if not self.W_dec.is_meta:  # built on the meta device, the caller assigns real tensors (foreign.build_checked)
            self.to(cfg.device)

    # ---- properties -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def k(self) -> int:
        """Latents per token of the TopK family (an error for an architecture without k)."""
        if self.cfg.k is None:
            raise ConfigError(f"a {self.cfg.architecture} SAE has no k")
        return self.cfg.k

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ---- input normalisation ----------------------------------------------------------------
    def check_input(self, x: Tensor) -> Tensor:
        """x in the SAE's dtype, or a one-line ShapeError when its width is not d_in."""
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeError(
                f"SAE input has last dimension {x.shape[-1]}, expected d_in={self.cfg.d_in} (shape {tuple(x.shape)})"
            )
        return x.to(self.dtype)

    def _factor(self, scale: float | list[float], width: int) -> float | Tensor:
        if isinstance(scale, (list, tuple)):  # one factor per block (crosscoder layer)
            return torch.tensor(scale, dtype=self.dtype, device=self.device).repeat_interleave(width // len(scale))
        return float(scale)

    def input_factor(self) -> float | Tensor:
        """What inputs are multiplied by before encoding (a float, or per-column for crosscoders)."""
        return self._factor(self.cfg.activation_scale, self.cfg.d_in)

    def output_factor(self) -> float | Tensor:
        """What reconstructions are divided by to return to the model's units."""
        scale = self.cfg.output_scale if self.cfg.output_scale is not None else self.cfg.activation_scale
        return self._factor(scale, self.cfg.d_out)

    def normalize_input(self, x: Tensor) -> tuple[Tensor, NormState | None]:
        """x in the space the SAE encodes (scaled, layer-normed where asked) and the state that undoes it."""
        state = None
        if self.cfg.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            x = x / (std + LAYER_NORM_EPS)
            state = (mu, std)
        factor = self.input_factor()
        if not isinstance(factor, float) or factor != 1.0:
            x = x * factor
        return x, state

    def normalize_target(self, y: Tensor) -> Tensor:
        """A transcoder's target in the space the decoder writes (scaled by the output factor)."""
        if y.shape[-1] != self.cfg.d_out:
            raise ShapeError(
                f"SAE target has last dimension {y.shape[-1]}, expected d_out={self.cfg.d_out} (shape {tuple(y.shape)})"
            )
        factor = self.output_factor()
        return y.to(self.dtype) * factor if not isinstance(factor, float) or factor != 1.0 else y.to(self.dtype)

    def denormalize(self, x: Tensor, state: NormState | None) -> Tensor:
        """A reconstruction back in the model's units (normalize_input undone)."""
        factor = self.output_factor()
        if not isinstance(factor, float) or factor != 1.0:
            x = x / factor
        if state is not None:
            mu, std = state
            x = x * std + mu
        return x

    # ---- encode / decode --------------------------------------------------------------------
    def centre(self, x: Tensor) -> Tensor:
        """What the encoder multiplies: the input less b_dec where the SAE subtracts it."""
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x_norm: Tensor) -> Tensor:
        """Pre-activations of a normalised input (for gated: the magnitude path π_mag)."""
        xc = self.centre(x_norm)
        if self.arch.pre_acts is not None:
            return self.arch.pre_acts(self, xc)
        return xc @ self.W_enc + self.b_enc

    def gate_pre_acts(self, x_norm: Tensor) -> Tensor:
        """Gated SAEs only: π_gate, whose sign decides which latents are active."""
        return self.centre(x_norm) @ self.W_enc + self.b_gate

    def activate(self, pre: Tensor, x_norm: Tensor | None = None, k: int | None = None) -> Tensor:
        """Latents from pre-activations (x_norm is needed by gated SAEs for the gate path). In training mode,
        the training form (BatchTopK: the batch's top k·B; k: this step's k, default cfg.k), as nn.Module's
        train() switches dropout; in eval mode the inference form (BatchTopK: the calibrated threshold)."""
        if not self.training and self.arch.infer is not None:
            return self.arch.infer(self, pre, x_norm)
        return self.arch.activate(self, pre, x_norm, self.cfg.k if k is None else k)

    @overload
    def encode(self, x: Tensor, return_norm: Literal[False] = False) -> Tensor: ...

    @overload
    def encode(self, x: Tensor, return_norm: Literal[True]) -> tuple[Tensor, NormState | None]: ...

    def encode(self, x: Tensor, return_norm: bool = False) -> Tensor | tuple[Tensor, NormState | None]:
        """Latents z (..., d_sae); with return_norm, also the layer-norm state decode() needs to undo the
        norm (None for SAEs without layer_norm), as OpenAI's encode returns it."""
        x = self.hook_sae_input(self.check_input(x))
        x_norm, norm = self.normalize_input(x)
        pre = self.hook_sae_acts_pre(self.pre_acts(x_norm))
        z = self.hook_sae_acts_post(self.activate(pre, x_norm))
        return (z, norm) if return_norm else z

    def decode(self, z: Tensor, norm: NormState | None = None) -> Tensor:
        """Reconstruction in the input's units: the activation scale undone, and a layer-norm SAE's norm undone
        with the state encode(x, return_norm=True) gave for those inputs.

        A skip transcoder's W_skip term depends on the input, so forward() adds it, as in SAELens."""
        if norm is None and self.cfg.normalize_activations == "layer_norm":
            raise ConfigError(
                "this SAE normalises each input (layer_norm): decode(z, norm) needs the norm state "
                "from encode(x, return_norm=True)"
            )
        x_hat = z.to(self.dtype) @ self.W_dec + self.b_dec
        return self.hook_sae_recons(self.denormalize(x_hat, norm))

    def skip(self, x_norm: Tensor) -> Tensor | float:
        """A skip transcoder's linear term (0.0 for everything else)."""
        return x_norm @ self.W_skip.T if self.cfg.skip_connection else 0.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, norm = self.encode(x, return_norm=True)
        x_hat = self.decode(z, norm)
        skip = self.skip(self.normalize_input(self.check_input(x))[0]) if self.cfg.skip_connection else 0.0
        if isinstance(skip, Tensor):
            x_hat = x_hat + self.denormalize(skip, None)
        return x_hat, z

    def reconstruct_clean(self, x: Tensor) -> Tensor:
        """x_hat without running any hook: what the error term of a splice is measured against."""
        x_norm, state = self.normalize_input(self.check_input(x))
        z = self.activate(self.pre_acts(x_norm), x_norm)
        return self.denormalize(z @ self.W_dec + self.b_dec + self.skip(x_norm), state)

    def gather_input(self, acts: dict[str, Tensor], hooks: list[str] | None = None) -> Tensor:
        """The SAE's input from activations by hook name (crosscoders: their layers side by side).

        hooks: where to read instead of cfg.input_hooks (e.g. a plain SAE evaluated at another hook)."""
        if self.cfg.crosscoder_models and not hooks:
            raise ConfigError(
                f"this crosscoder diffs {' and '.join(self.cfg.crosscoder_models)}: it reads two models' activations "
                "at one hook, which one model cannot give; study it with `nanosae diff RUN`"
            )
        return concat_hooks(acts, hooks or self.cfg.input_hooks)

    def output_blocks(self, x_hat: Tensor, hooks: list[str] | None = None) -> dict[str, Tensor]:
        """A reconstruction split into the output hooks' values (one per crosscoder layer)."""
        hooks = hooks or self.cfg.output_hooks
        return dict(zip(hooks, x_hat.chunk(len(hooks), dim=-1)))

    def decoder_norms(self) -> Tensor:
        """Per-latent decoder norm; a crosscoder sums its per-layer norms (its L1 weights)."""
        if self.cfg.crosscoder_hooks:
            return self.W_dec.view(self.cfg.d_sae, self.cfg.n_blocks, -1).norm(dim=-1).sum(-1)
        return self.W_dec.norm(dim=1)

    def splice(self, x: Tensor) -> Tensor:
        """What the host model sees when this SAE is spliced in at its hook.

        With use_error_term the output is x_hat + (x - x_hat_clean): exactly x until a hook edits the
        latents, and then x plus the edit's effect (TransformerLens HookedSAE semantics).
        """
        if self.cfg.kind != "sae":
            raise ShapeError(
                f"splice() is for SAEs at one hook; a {self.cfg.kind} reads {self.cfg.input_hooks} and writes "
                f"{self.cfg.output_hooks}"
            )
        x_hat, _ = self(x)
        if self.use_error_term:
            with torch.no_grad():
                error = self.check_input(x) - self.reconstruct_clean(x)
            x_hat = x_hat + self.hook_sae_error(error)
        return self.hook_sae_output(x_hat).to(x.dtype)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """cfg.json + sae_weights.safetensors into directory path (the SAELens layout), atomically."""
        return formats.save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", normalize: bool | None = None) -> SAE:
        """Load our dir, SAELens's, an OpenAI sparse_autoencoder .pt (normalize: override its LN flag), or the
        field's other formats (sae/foreign.py). In eval mode: a loaded SAE infers (BatchTopK by its threshold)."""
        check_device(device)
        return formats.load_sae(path, device=device, normalize=normalize, build=cls).eval()
