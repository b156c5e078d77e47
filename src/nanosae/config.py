"""Dataclass configs. The CLI maps its flags 1:1 onto these fields; a run saves its config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nanosae.errors import ConfigError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "layer_norm")
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class SAEConfig:
    """Shape and behaviour of one sparse autoencoder (the keys of cfg.json)."""

    d_in: int
    """Width of the activations the SAE reads (e.g. the host model's d_model)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """One of relu, topk, batchtopk, jumprelu, gated."""
    k: int | None = None
    """Active latents per token for topk / batchtopk."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (Anthropic/OpenAI convention)."""
    normalize_activations: str = "none"
    """'none' or 'layer_norm' (OpenAI TopK models: centre and divide by std per token, undone on output)."""
    activation_scale: float = 1.0
    """Inputs are multiplied by this before encoding and outputs divided by it (norm scaling from training)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel in JumpReLU's pseudo-derivative."""
    dtype: str = "float32"
    device: str = "cpu"
    hook_name: str = ""
    """Hook point the SAE was trained on, e.g. blocks.15.hook_resid_post."""
    model_name: str = ""
    context_size: int | None = None
    dataset_path: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalize_activations {self.normalize_activations!r}; expected one of {', '.join(NORMALIZATIONS)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if self.architecture in ("topk", "batchtopk"):
            if self.k is None or not 0 < int(self.k) <= self.d_sae:
                raise ConfigError(f"architecture {self.architecture} needs k in 1..d_sae={self.d_sae}, got k={self.k!r}")
            self.k = int(self.k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


@dataclass
class DataConfig:
    """Which text to read and how to turn it into token windows."""

    specs: list[str] = field(default_factory=lambda: ["builtin:pydocs"])
    """Corpora: builtin:pydocs, builtin:stdlib, .txt/.jsonl/.parquet files, dirs, globs, hf:NAME."""
    context_size: int = 256
    """Tokens per window."""
    pack: bool = True
    """Pack documents into full windows (BOS between documents); off: one truncated window per document."""
    exclude_first: int = 0
    """Also drop the first N positions of every window (BOS positions are always dropped)."""
    split: str = "train"
    """Documents to use: train (all but every 20th), eval (every 20th), all."""
    shuffle_buffer: int = 0
    """Shuffle documents through a buffer of this many (0 = corpus order)."""
    seed: int = 0
    text_field: str = "text"
    """Field holding the text in .jsonl / .parquet / HF datasets."""
    txt_paragraphs: bool = False
    """One document per blank-line-separated block of a .txt file (instead of one per file)."""
    encoding_errors: str = "strict"
    """Non-UTF-8 bytes: strict (stop with an error) or replace."""


@dataclass
class CollectConfig:
    """Collect activations from a host model into an on-disk store (one directory per hook)."""

    model: str = "smollm2-135m"
    """Host model spec: smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    """Hook points to capture in one pass."""
    data: DataConfig = field(default_factory=DataConfig)
    tokens: int = 100_000
    """Activations to collect per hook (BOS positions excluded)."""
    out: str = "runs/acts"
    """Output directory; each hook gets a subdirectory."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: str = "float16"
    """Storage dtype: float16, bfloat16 or float32."""
    tokens_per_shard: int = 32768
    device: str = "cpu"
    tokenizer: str | None = None
    """nanochat tokenizer directory, when not next to the checkpoints."""
