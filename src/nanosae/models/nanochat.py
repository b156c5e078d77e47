"""nanochat checkpoints: our own re-implementation of nanochat's GPT, numerically equal to it.

Two generations load (chosen from the state-dict keys):
- released (late 2025): norm after the embedding, rotary (base 10000, cos/sin rounded to bf16), QK-norm
  after rotary, GQA, relu² MLP, untied lm_head, logits soft-capped at 15.
- current master adds: per-layer resid/x0 lambdas on each block's input, the smear of the previous
  token's embedding, value embeddings mixed into V through a gate on alternating layers, backout of the
  middle layer's residual, sliding windows, a padded vocabulary, rotary base 100000 in the compute
  dtype and q, k scaled by 1.2 after the norm.
Each optional piece is switched on by its keys, so checkpoints from between the two also load.
Rotary rotates by -θ on split halves: y1 = x1·cos + x2·sin, y2 = -x1·sin + x2·cos.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanosae.errors import FormatError, first_line
from nanosae.io import is_number, read_json
from nanosae.models.host import HostModel, LayerModules
from nanosae.models.tokenizers import NanochatTokenizer, Tokenizer

SOFTCAP = 15.0
CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


@dataclass
class NanochatConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "L"
    padded_vocab_size: int = 0
    """Rows of wte/lm_head (current master pads to a multiple of 64); 0 means vocab_size."""
    current: bool = False
    """Current-master numerics: rotary base 100000 in fp32, q/k scaled by 1.2, sliding windows."""
    resid_lambdas: bool = False
    smear_channels: int = 0
    backout: bool = False
    value_embed_layers: tuple[int, ...] = ()
    ve_gate_channels: int = 12

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def window_sizes(self) -> list[int | None]:
        """Per-layer left window (None = unlimited); the last layer is always long."""
        if not self.current:
            return [None] * self.n_layer
        long_window = self.sequence_len
        short_window = -(-long_window // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes: list[int | None] = [
            long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(self.n_layer)
        ]
        sizes[-1] = long_window
        return sizes


def norm(x: Tensor, frozen: bool = False) -> Tensor:
    """RMSNorm without weights; frozen: the same values, with the scale 1/rms a constant for autograd."""
    if frozen:
        return x * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(cfg: NanochatConfig, seq_len: int) -> tuple[Tensor, Tensor]:
    base = 100000 if cfg.current else 10000
    channels = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (channels / cfg.head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if not cfg.current:  # the released code keeps them in bf16 even for fp32 activations
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3).to(x.dtype)


class KVCache:
    def __init__(self, n_layer: int):
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.pos = 0
        self.prev_embedding: Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: NanochatConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        hd = cfg.head_dim
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        has_ve = layer in cfg.value_embed_layers
        self.ve_gate = nn.Linear(cfg.ve_gate_channels, cfg.n_kv_head, bias=False) if has_ve else None

    def forward(
        self,
        x: Tensor,
        ve: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        window: int | None,
        cache: KVCache | None,
        frozen: bool = False,
    ) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.c_v(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if ve is not None:
            assert self.ve_gate is not None  # a layer given value embeddings has their gate
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : cfg.ve_gate_channels]))
            gate = gate.detach() if frozen else gate
            v = v + gate.unsqueeze(-1) * ve.view(B, T, cfg.n_kv_head, cfg.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        if cfg.current:
            q, k = q * 1.2, k * 1.2
        if frozen:  # the attention pattern is a constant
            q, k = q.detach(), k.detach()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            past_k, past_v = cache.k[self.layer], cache.v[self.layer]
            if past_k is not None and past_v is not None:
                k = torch.cat([past_k, k], dim=2)
                v = torch.cat([past_v, v], dim=2)
            cache.k[self.layer], cache.v[self.layer] = k, v
        if cfg.n_kv_head != cfg.n_head:
            k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
        Tk = k.shape[2]
        if Tk == T and (window is None or window >= T):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            rows = (Tk - T) + torch.arange(T, device=x.device)[:, None]
            cols = torch.arange(Tk, device=x.device)[None, :]
            allowed = cols <= rows
            if window is not None:
                allowed &= (rows - cols) <= window
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: NanochatConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: NanochatConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        ve: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        window: int | None,
        cache: KVCache | None,
        frozen: bool = False,
    ) -> Tensor:
        x = x + self.attn(norm(x, frozen), ve, cos, sin, window, cache, frozen)
        return x + self.mlp(norm(x, frozen))


class NanochatGPT(nn.Module):
    """Module and parameter names as in nanochat, so its state dicts load with strict=True.

    frozen (set by `frozen_for_attribution`): attention patterns, norm scales and gates are constants for
    autograd and the logits come before the softcap, so the model is linear in its residual stream (circuits);
    embed_out is where the token embeddings (after the norm and smear) enter, read and replaced there."""

    transformer: Any  # ModuleDict(wte, h): attributes by name, as nanochat's
    cos: Tensor  # rotary tables (buffers)
    sin: Tensor

    def __init__(self, cfg: NanochatConfig):
        super().__init__()
        self.config = cfg
        self.frozen = False
        self.embed_out = nn.Identity()
        vocab = cfg.padded_vocab_size or cfg.vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, cfg.n_embd),
                "h": nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(cfg.n_embd, vocab, bias=False)
        if cfg.resid_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        if cfg.smear_channels:
            self.smear_gate = nn.Linear(cfg.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if cfg.value_embed_layers:
            kv_dim = cfg.n_kv_head * cfg.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in cfg.value_embed_layers})
        self.windows = cfg.window_sizes()
        cos, sin = rotary_tables(cfg, cfg.sequence_len * 10)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _smear(self, x: Tensor, cache: KVCache | None) -> Tensor:
        c = self.config.smear_channels
        prev = cache.prev_embedding if cache is not None else None
        if cache is not None:
            cache.prev_embedding = x[:, -1:, :]
        if x.shape[1] > 1:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, 1:, :c]))
            gate = gate.detach() if self.frozen else gate
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        if prev is not None:
            return x + self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, :, :c])) * prev
        return x

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        cfg = self.config
        T = idx.shape[1]
        t0 = cache.pos if cache is not None else 0
        if t0 + T > self.cos.shape[1]:
            raise FormatError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.cos.shape[1]})")
        cos, sin = self.cos[:, t0 : t0 + T], self.sin[:, t0 : t0 + T]
        x = norm(self.transformer.wte(idx).to(self.lm_head.weight.dtype), self.frozen)
        if cfg.smear_channels:
            x = self._smear(x, cache)
        x = self.embed_out(x)
        x0, x_backout = x, None
        for i, block in enumerate(self.transformer.h):
            if cfg.resid_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in getattr(self, "value_embeds", {}) else None
            x = block(x, ve, cos, sin, self.windows[i], cache, self.frozen)
            if cfg.backout and i == cfg.n_layer // 2:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        logits = self.lm_head(norm(x, self.frozen))[..., : cfg.vocab_size].float()
        if cache is not None:
            cache.pos += T
        return logits if self.frozen else SOFTCAP * torch.tanh(logits / SOFTCAP)


@contextmanager
def frozen_for_attribution(module: NanochatGPT) -> Iterator[None]:
    """Inside: the model is linear in its residual stream (see NanochatGPT), its values unchanged but the logits
    taken before the softcap."""
    module.frozen = True
    try:
        yield
    finally:
        module.frozen = False


def nanochat_layers(module: Any) -> list[LayerModules]:
    return [LayerModules(b, b.attn, b.mlp, b.mlp.c_proj) for b in module.transformer.h]


class NanochatModel(HostModel):
    """Our NanochatGPT, or (through wrap) a live nanochat GPT with the same module layout."""

    module: Any  # NanochatGPT, or a live nanochat GPT: nanochat's attribute names

    def __init__(self, module: Any, tokenizer: Tokenizer | None, name: str):
        self.name = name
        self.module = module.eval()
        self.tokenizer = tokenizer  # type: ignore[assignment]
        self.layers = nanochat_layers(module)
        self.d_model = int(module.config.n_embd)
        down: Any = self.layers[0].mlp_down  # an nn.Linear
        self.d_mlp = int(down.in_features)

    def _logits(self, tokens: Tensor) -> Tensor:
        return self.module(tokens)

    def _new_cache(self) -> Any:
        return KVCache(self.n_layers) if isinstance(self.module, NanochatGPT) else None

    def _logits_cached(self, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
        if isinstance(cache, KVCache):
            return self.module(tokens, cache), cache
        return super()._logits_cached(tokens, cache)  # a live nanochat module: recompute the prefix

    def unembed(self) -> tuple[Any, Tensor]:
        return norm, self.module.lm_head.weight[: self.module.config.vocab_size].T


# ---- checkpoints ------------------------------------------------------------------------------
def find_checkpoint(directory: Path, step: int | None) -> tuple[Path, Path, int]:
    steps = sorted(
        int(m.group(1)) for p in directory.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))
    )
    if not steps:
        raise FormatError(f"{directory}: no model_<step>.pt checkpoint files")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FormatError(f"{directory}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    model_path, meta_path = directory / f"model_{step:06d}.pt", directory / f"meta_{step:06d}.json"
    if not meta_path.exists():
        raise FormatError(f"{meta_path} is missing (nanochat writes model_{step:06d}.pt together with it)")
    return model_path, meta_path, step


def config_from_checkpoint(model_config: dict[str, Any], state: dict[str, Tensor], where: Path) -> NanochatConfig:
    missing = [k for k in CONFIG_KEYS if k not in model_config]
    if missing:
        raise FormatError(f"{where}: model_config lacks {', '.join(missing)}")
    for k in CONFIG_KEYS:
        v = model_config[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise FormatError(f"{where}: model_config.{k} must be a positive integer, got {v!r:.40}")
    if model_config["n_embd"] % model_config["n_head"] or model_config["n_head"] % model_config["n_kv_head"]:
        raise FormatError(f"{where}: n_embd must be divisible by n_head, and n_head by n_kv_head")
    ve_layers = tuple(sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"value_embeds\.(\d+)\.weight", k))))
    smear = state.get("smear_gate.weight")
    current = any(k in state for k in ("resid_lambdas", "smear_gate.weight", "backout_lambda")) or bool(ve_layers)
    gate_key = f"transformer.h.{ve_layers[0]}.attn.ve_gate.weight" if ve_layers else None
    return NanochatConfig(
        **{k: int(model_config[k]) for k in CONFIG_KEYS},
        window_pattern=str(model_config.get("window_pattern", "L")),
        padded_vocab_size=int(state["transformer.wte.weight"].shape[0]) if "transformer.wte.weight" in state else 0,
        current=current,
        resid_lambdas="resid_lambdas" in state,
        smear_channels=int(smear.shape[1]) if smear is not None else 0,
        backout="backout_lambda" in state,
        value_embed_layers=ve_layers,
        ve_gate_channels=int(state[gate_key].shape[1]) if gate_key in state else 12,
    )


def find_tokenizer_dir(checkpoint_dir: Path, explicit: str | Path | None) -> Path | None:
    """As nanochat resolves it: the tokenizer/ directory of its base dir (checkpoints live two levels below)."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        checkpoint_dir / "tokenizer",
        checkpoint_dir.parent / "tokenizer",
        checkpoint_dir.parent.parent / "tokenizer",
    ]
    if os.environ.get("NANOCHAT_BASE_DIR"):
        candidates.append(Path(os.environ["NANOCHAT_BASE_DIR"]) / "tokenizer")
    candidates.append(Path.home() / ".cache" / "nanochat" / "tokenizer")
    for c in candidates:
        if (c / "tokenizer.pkl").exists():
            return c
    if explicit:
        raise FormatError(f"{explicit}: no tokenizer.pkl there")
    return None


def load_nanochat(
    spec: str, device: str = "cpu", dtype: torch.dtype | None = None, tokenizer_dir: str | Path | None = None
) -> NanochatModel:
    """spec: a checkpoint directory, optionally with @STEP (default: the latest step)."""
    path_str, _, step_str = spec.partition("@")
    directory = Path(path_str)
    if not directory.is_dir():
        raise FormatError(f"nanochat checkpoint directory not found: {directory}")
    if step_str and not is_number(step_str):
        raise FormatError(f"nanochat:{spec}: the step after @ must be a number, got {step_str!r}")
    model_path, meta_path, step = find_checkpoint(directory, int(step_str) if step_str else None)
    meta = read_json(meta_path)
    if not isinstance(meta.get("model_config"), dict):
        raise FormatError(f"{meta_path}: no model_config object")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated/corrupt/unsafe files
        raise FormatError(f"{model_path} could not be read: {first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FormatError(f"{model_path}: expected a state dict of tensors, got {type(state).__name__}")
    compute = dtype or torch.float32
    state = {k.removeprefix("_orig_mod."): v.to(compute) if v.is_floating_point() else v for k, v in state.items()}
    cfg = config_from_checkpoint(meta["model_config"], state, meta_path)
    model = NanochatGPT(cfg)
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise FormatError(f"{model_path}: unknown keys {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise FormatError(f"{model_path}: missing keys {', '.join(missing[:8])}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise FormatError(
                f"{model_path}: {k} has shape {tuple(state[k].shape)} but {meta_path.name} implies "
                f"{tuple(v.shape)} (checkpoint/config mismatch)"
            )
    model.load_state_dict(state, strict=True)
    tok_dir = find_tokenizer_dir(directory, tokenizer_dir)
    if tok_dir is None:
        raise FormatError(
            f"no nanochat tokenizer.pkl found near {directory} (looked in tokenizer/ beside and above it, "
            "$NANOCHAT_BASE_DIR/tokenizer, ~/.cache/nanochat/tokenizer); pass tokenizer_dir / --tokenizer DIR"
        )
    tokenizer = NanochatTokenizer.from_directory(tok_dir)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise FormatError(
            f"{tok_dir}/tokenizer.pkl has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    return NanochatModel(model.to(device=device, dtype=compute), tokenizer, f"nanochat:{directory}@{step}")
