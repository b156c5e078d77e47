"""Dataclass configs. The CLI maps its flags 1:1 onto these fields; a run saves its config."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from nanosae import registry
from nanosae.errors import ConfigError

InputNorm = Literal["none", "layer_norm"]
LRSchedule = Literal["constant", "cosine", "linear"]
BDecInit = Literal["geometric_median", "mean", "zeros"]
StoreDtype = Literal["float16", "bfloat16", "float32"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
Ablation = Literal["zero", "mean"]
Suite = Literal["core", "full"]
LITERALS = {
    "InputNorm": InputNorm,
    "LRSchedule": LRSchedule,
    "BDecInit": BDecInit,
    "StoreDtype": StoreDtype,
    "ModelDtype": ModelDtype,
    "Ablation": Ablation,
    "Suite": Suite,
}
NORMALIZATIONS = get_args(InputNorm)
DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct (models.hf)
TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""The dtypes nanosae names (SAE weights: all four; activation stores: StoreDtype)."""
STORE_DTYPES = {name: TORCH_DTYPES[name] for name in get_args(StoreDtype)}


def model_dtype(name: str, device: str) -> torch.dtype:
    """The host model's compute dtype: `auto` is bfloat16 on a GPU (as the field runs models there) and float32
    on the CPU (where bfloat16 matmuls are slower and the stored activations would differ for no gain)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return TORCH_DTYPES[name]


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether value fits a field annotation such as 'int', 'float | list[float]' or 'list[str] | None'."""
    for alt in (a.strip() for a in annotation.split("|")):
        if (
            alt == "None"
            and value is None
            or alt == "bool"
            and isinstance(value, bool)
            or alt == "str"
            and isinstance(value, str)
        ):
            return True
        if isinstance(value, bool):
            continue
        if alt == "int" and isinstance(value, int):
            return True
        if alt == "float" and isinstance(value, (int, float)) and math.isfinite(value):
            return True
        if alt.startswith("list[") and isinstance(value, (list, tuple)) and all(_type_ok(v, alt[5:-1]) for v in value):
            return True
        part = globals().get(alt)  # a nested config (DataConfig, SourceConfig, ...): defined in this module
        if isinstance(part, type) and dataclasses.is_dataclass(part) and isinstance(value, part):
            return True
        if alt in LITERALS and isinstance(value, str) and value in get_args(LITERALS[alt]):
            return True
    return False


def check_fields(config: Any) -> None:
    """Every field of a config dataclass has its annotated type (bools are not numbers; floats are finite;
    integral floats such as 32.0 from other tools' JSON become ints), or a one-line ConfigError names it."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None and f.metadata.get("derived"):  # None: derived in __post_init__
            continue
        annotation = str(f.type)  # a string: the module is annotated with `from __future__ import annotations`
        if isinstance(value, float) and value.is_integer() and annotation.split("|")[0].strip() == "int":
            value = int(value)
            setattr(config, f.name, value)
        if not _type_ok(value, annotation):
            raise ConfigError(f"{f.name} must be {_describe(annotation)}, got {_brief(value)}")


_WORDS = {
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "bool": "true or false",
    "list[int]": "a list of integers",
    "list[float]": "a list of finite numbers",
    "list[str]": "a list of strings",
    "DataConfig": "a DataConfig",
}


def _describe(annotation: str) -> str:
    words = [
        ("one of " + ", ".join(get_args(LITERALS[a.strip()])))
        if a.strip() in LITERALS
        else _WORDS.get(a.strip(), a.strip())
        for a in annotation.split("|")
        if a.strip() != "None"
    ]
    return " or ".join(words)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """A one-line ConfigError when a number (or each of a list) is outside [low, high] (bounds optional / open)."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None:
            continue
        below = low is not None and (v <= low if open_low else v < low)
        above = high is not None and (v >= high if open_high else v > high)
        if below or above:
            lo = "" if low is None else f"{'>' if open_low else '≥'} {_number(low)}"
            hi = "" if high is None else f"{'<' if open_high else '≤'} {_number(high)}"
            raise ConfigError(f"{name} must be {' and '.join(b for b in (lo, hi) if b)}, got {_brief(v)}")


MAX_LATENTS = 1 << 24  # 16.7M: past the largest published dictionaries; a larger d_sae is a typo (1e12)
MAX_SEED = 2**32 - 1


def check_device(device: str, name: str = "device") -> str:
    """A device this machine has: cpu, cuda / cuda:N with CUDA present, or mps where present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{name} {_brief(device)} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} {device!r}: no CUDA device is usable here (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{name} {device!r}: no MPS device here; use cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"{name} {device!r}: nanosae runs on cpu, cuda or mps")
    return device


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_target_l0(arch: registry.Architecture, target: float | None, d_sae: int) -> None:
    """target_l0 shapes the L0 penalty, which only JumpReLU's loss has."""
    check_range("target_l0", target, 0, d_sae, open_low=True)
    if target is not None and arch.loss_terms is not registry.get("jumprelu").loss_terms:
        how = "its k" if arch.uses_k else "its sparsity coefficient"
        raise ConfigError(f"target_l0 is for jumprelu SAEs; a {arch.name} SAE's L0 is set by {how}")


@dataclass
class SAEConfig:
    """Shape and behaviour of one sparse autoencoder (the keys of cfg.json)."""

    d_in: int
    """Width of the activations the SAE reads (e.g. the host model's d_model)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = registry.DEFAULT_ARCHITECTURE
    """A registered architecture (nanosae.registry): relu, topk, batchtopk, jumprelu, gated, matryoshka."""
    k: int | None = None
    """Active latents per token for topk / batchtopk / matryoshka."""
    matryoshka_groups: list[int] | None = None
    """Matryoshka: the nested prefix sizes whose reconstructions all enter the loss (default d/8, d/4, d/2, d)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding (Anthropic/OpenAI convention); default: yes, except for
    transcoders (their b_dec lives in the output space)."""
    normalize_activations: str = "none"
    """'none' or 'layer_norm' (OpenAI TopK models: centre and divide by std per token, undone on output)."""
    activation_scale: float | list[float] = 1.0
    """Inputs are multiplied by this before encoding and outputs divided by it (norm scaling from training);
    crosscoders keep one factor per layer."""
    output_scale: float | None = None
    """Transcoders: the target's factor (outputs are divided by it); None = activation_scale."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel in JumpReLU's pseudo-derivative."""
    target_l0: float | None = None
    """JumpReLU: train towards this L0 with Gemma Scope 2's quadratic penalty, 2/t·(L0 − t)² per token, instead of
    L0 itself (so one run lands near an L0 without a sweep of the sparsity coefficient)."""
    dtype: str = "float32"
    device: str = "cpu"
    hook_name: str = ""
    """Hook point the SAE was trained on, e.g. blocks.15.hook_resid_post."""
    d_out: int = field(default=None, metadata={"derived": True})  # type: ignore[assignment]
    """Width of what is reconstructed: d_in, except for transcoders (the target hook's width)."""
    hook_name_out: str = ""
    """Transcoders: the hook predicted from hook_name's activation (e.g. blocks.L.hook_mlp_out)."""
    skip_connection: bool = False
    """Transcoders: add a learned linear map of the input, W_skip (d_out, d_in), to the output."""
    crosscoder_hooks: list[str] | None = None
    """Crosscoders: the hooks (layers) read and reconstructed together; the input is their concatenation."""
    crosscoder_models: list[str] | None = None
    """Model-diffing crosscoders: the model each block was read from (one hook of two models: the hooks repeat)."""
    model_name: str = ""
    context_size: int | None = None
    dataset_path: str = ""

    def __post_init__(self) -> None:
        check_fields(self)
        arch = registry.get(self.architecture)
        check_range("activation_scale", self.activation_scale, 0, open_low=True)
        check_range("output_scale", self.output_scale, 0, open_low=True)
        check_range("jumprelu_bandwidth", self.jumprelu_bandwidth, 0, open_low=True)
        check_range("context_size", self.context_size, 0)
        check_range("d_out", self.d_out, 1)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalize_activations {self.normalize_activations!r}; "
                f"expected one of {', '.join(NORMALIZATIONS)}"
            )
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(TORCH_DTYPES)}")
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        self._check_io()
        check_range("matryoshka_groups", self.matryoshka_groups, 1)
        if arch.nested:
            groups = self.matryoshka_groups or [self.d_sae // 8, self.d_sae // 4, self.d_sae // 2, self.d_sae]
            groups = sorted({int(g) for g in groups if int(g) > 0} | {self.d_sae})
            if groups[-1] != self.d_sae or any(g > self.d_sae for g in groups):
                raise ConfigError(
                    f"matryoshka_groups must be prefix sizes up to d_sae={self.d_sae}, got {self.matryoshka_groups}"
                )
            self.matryoshka_groups = groups
        if arch.uses_k:
            if self.k is None or not 0 < int(self.k) <= self.d_sae:
                raise ConfigError(
                    f"architecture {self.architecture} needs k in 1..d_sae={self.d_sae}, got k={self.k!r}"
                )
            self.k = int(self.k)
        check_target_l0(arch, self.target_l0, self.d_sae)

    def _check_io(self) -> None:
        """Transcoder / crosscoder consistency (both are this same SAE with other inputs and outputs)."""
        if self.hook_name_out and self.crosscoder_hooks:
            raise ConfigError(
                "an SAE is either a transcoder (hook_name_out) or a crosscoder (crosscoder_hooks), not both"
            )
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_out != self.d_in and not self.hook_name_out:
            raise ConfigError(
                f"d_out={self.d_out} differs from d_in={self.d_in}, which only a transcoder (hook_name_out) allows"
            )
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.hook_name_out
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ConfigError("apply_b_dec_to_input needs d_out == d_in (b_dec is the output bias)")
        if self.skip_connection and not self.hook_name_out:
            raise ConfigError("skip_connection is for transcoders (set hook_name_out)")
        if (self.hook_name_out or self.crosscoder_hooks) and self.normalize_activations != "none":
            raise ConfigError("layer_norm input normalisation is only supported for plain SAEs")
        if self.crosscoder_hooks:
            n = len(self.crosscoder_hooks)
            if n < 2 or self.d_in % n:
                raise ConfigError(
                    f"a crosscoder needs at least 2 hooks and d_in divisible by them; got {n} hooks, d_in={self.d_in}"
                )
            self.hook_name = self.hook_name or self.crosscoder_hooks[0]
            models = self.crosscoder_models
            if models is not None and (len(models) != n or len(set(zip(models, self.crosscoder_hooks))) != n):
                raise ConfigError(
                    f"crosscoder_models {models} must name one model per hook {self.crosscoder_hooks}, no pair twice"
                )
            if models is None and len(set(self.crosscoder_hooks)) != n:
                raise ConfigError(f"crosscoder_hooks {self.crosscoder_hooks} repeat a hook; name the models apart")
        elif self.crosscoder_models:
            raise ConfigError("crosscoder_models is for crosscoders (set crosscoder_hooks)")
        scales = self.activation_scale
        if isinstance(scales, (list, tuple)) and len(scales) != self.n_blocks:
            raise ConfigError(
                f"activation_scale has {len(scales)} factors, expected one per input block ({self.n_blocks})"
            )

    @property
    def kind(self) -> str:
        """sae, transcoder or crosscoder."""
        return "transcoder" if self.hook_name_out else "crosscoder" if self.crosscoder_hooks else "sae"

    @property
    def n_blocks(self) -> int:
        """Equal-width blocks the input (and output) splits into: one per crosscoder layer, else 1."""
        return len(self.crosscoder_hooks) if self.crosscoder_hooks else 1

    @property
    def input_hooks(self) -> list[str]:
        return list(self.crosscoder_hooks) if self.crosscoder_hooks else [self.hook_name]

    @property
    def output_hooks(self) -> list[str]:
        return list(self.crosscoder_hooks) if self.crosscoder_hooks else [self.hook_name_out or self.hook_name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})


@dataclass
class DataConfig:
    """Which text to read and how to turn it into token windows."""

    specs: list[str] = field(default_factory=lambda: ["builtin:pydocs"], metadata={"flag": "data"})
    """Corpus (repeatable): builtin:pydocs, builtin:stdlib, a .txt/.jsonl/.parquet file, dir or glob, hf:NAME."""
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
    shuffle_seed: int = 0
    """Seed of the document shuffle buffer."""
    text_field: str = "text"
    """Field holding the text in .jsonl / .parquet / HF datasets."""
    txt_paragraphs: bool = False
    """One document per blank-line-separated block of a .txt file (instead of one per file)."""
    encoding_errors: str = "strict"
    """Non-UTF-8 bytes: strict (stop with an error) or replace."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """From a saved dict (a manifest's "data", a config.json), older key names included."""
        d = {("shuffle_seed" if k == "seed" else k): v for k, v in d.items()}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def __post_init__(self) -> None:
        if isinstance(self.specs, str):
            self.specs = [self.specs]
        check_fields(self)
        check_range("context_size", self.context_size, 2)
        check_range("exclude_first", self.exclude_first, 0, self.context_size - 1)
        check_range("shuffle_buffer", self.shuffle_buffer, 0)
        if self.split not in ("all", "train", "eval"):
            raise ConfigError(f"unknown split {self.split!r}; expected all, train or eval")
        if self.encoding_errors not in ("strict", "replace"):
            raise ConfigError(f"unknown encoding_errors {self.encoding_errors!r}; expected strict or replace")


def default_batch_size(tokens: int) -> int:
    """About 1000 optimizer steps for short runs (tokens/1000 rounded to a power of two), capped at 4096-token
    batches: at a fixed token budget more steps give a better CE-loss score, until batches get so small that
    latents die; the learning rate follows the batch (train.schedule.Schedule) so they do not (docs/benchmarks.md)."""
    return int(max(1, min(4096, tokens, 2 ** round(math.log2(max(1.0, tokens / 1000))))))


@dataclass
class CollectConfig:
    """Collect activations from a host model into an on-disk store (one directory per hook)."""

    model: str = DEFAULT_MODEL
    """Host model spec: smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"], metadata={"flag": "hook"})
    """Hook point (repeatable: all are captured in one pass)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokens: int = 100_000
    """Activations to collect per hook (BOS positions excluded)."""
    out: str = "runs/acts"
    """Output directory; each hook gets a subdirectory."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: StoreDtype = "float16"
    """Storage dtype: float16, bfloat16 or float32."""
    tokens_per_shard: int = 32768
    """Tokens per shard file."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, ..."""
    model_dtype: ModelDtype = "auto"
    """The host model's compute dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16."""
    tokenizer: str | None = None
    """nanochat tokenizer directory (default: tokenizer/ next to the checkpoints, $NANOCHAT_BASE_DIR)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("tokens", "batch_size", "tokens_per_shard"):
            check_range(name, getattr(self, name), 1)
        check_device(self.device)


@dataclass
class GenerationConfig:
    """How a continuation is sampled (generate, track, steer)."""

    max_new_tokens: int = 32
    """Tokens to generate."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int | None = None
    """Sample only from the k most likely tokens."""
    seed: int = 0
    """Seed of the sampler (steering compares both generations under the same seed)."""
    chat: bool = False
    """Wrap the prompt in the model's chat format."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range("max_new_tokens", self.max_new_tokens, 0)
        check_range("temperature", self.temperature, 0)
        check_range("top_k", self.top_k, 1)


@dataclass
class EvalConfig:
    """Evaluate SAEs on held-out text: reconstruction, sparsity, and the model's loss with each SAE spliced in."""

    data: DataConfig = field(default_factory=lambda: DataConfig(split="eval"))
    tokens: int = 20_000
    """Evaluation tokens."""
    batch_size: int = 8
    """Windows per forward pass."""
    ablation: Ablation = "zero"
    """Baseline of the CE-loss score: zero or mean ablation of what the SAE replaces."""
    suite: Suite = "core"
    """core: reconstruction, sparsity, CE/KL; full: also absorption, sparse probing and explanation scores."""
    probing_task: list[str] = field(default_factory=list)
    """With --suite full: your own sparse-probing task, a JSONL file of {"text": ..., "labels": 0/1 or one 0/1 per
    token} (repeatable; each file is a task named after it)."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range("tokens", self.tokens, 1)
        check_range("batch_size", self.batch_size, 1)
        if self.probing_task and self.suite != "full":
            raise ConfigError("--probing-task is part of the full suite; add --suite full")


DENSE_THRESHOLD = 0.05  # a latent firing on more than this share of tokens is "dense": shown apart, not first
NODE_THRESHOLD = 0.8  # an attribution graph keeps the nodes carrying this share of the influence on the logits
EDGE_THRESHOLD = 0.98  # ... and the edges carrying this share of the pruned graph's influence (circuit-tracer's)


@dataclass
class TraceConfig:
    """Trace a prompt's next token through a transcoder set into an attribution graph."""

    transcoders: str = ""
    """A transcoder set: the run directory of `train --transcoders`, a circuit-tracer directory, or hf:ORG/REPO."""
    out: str | None = None
    """The graph file (default: TRANSCODERS/graphs/SLUG.json for nanosae's sets; never overwritten)."""
    model: str | None = None
    """The host model (default: the one the set names)."""
    scan: str | None = None
    """The graph's scan id, which Neuronpedia files it under (default: the model's name, sanitised)."""
    batch_size: int = 32
    """Attribution targets per backward pass (memory grows with it)."""
    targets: list[str] = field(default_factory=list, metadata={"flag": "target"})
    """A next token (its text, one token) to trace instead of the most likely ones (repeatable)."""
    versus: str | None = None
    """A token whose logit is subtracted from each target's: trace a logit difference (e.g. " Paris" vs " London")."""
    node_threshold: float = NODE_THRESHOLD
    """Keep the features and errors carrying this share of the influence on the logits."""
    edge_threshold: float = EDGE_THRESHOLD
    """Keep the edges carrying this share of the pruned graph's influence."""
    rank_tokens: bool = False
    """Rank input tokens with the features and errors for the node cut and the influence field, as circuit-tracer
    does (tokens are kept either way)."""
    max_feature_nodes: int = 1024
    """Compute incoming edges for at most this many features (the most influential first)."""
    paths: int = 5
    """Input tokens whose strongest path to the top logit is printed (one per token)."""
    device: str = "cpu"
    """Where the model and transcoders run."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.transcoders:
            raise ConfigError("--transcoders is required: the run directory of `nanosae train --transcoders`")
        for name in ("node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        for name in ("max_feature_nodes", "paths", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_device(self.device)


@dataclass
class PruneConfig:
    """Prune a traced graph again at other thresholds, from the unpruned graph `trace` saved beside its file."""

    out: str = field(default="", metadata={"required": True})
    """The new graph file (never overwritten)."""
    node_threshold: float = NODE_THRESHOLD
    """Keep the features and errors carrying this share of the influence on the logits."""
    edge_threshold: float = EDGE_THRESHOLD
    """Keep the edges carrying this share of the pruned graph's influence."""
    rank_tokens: bool = False
    """Rank input tokens with the features and errors for the node cut and the influence field, as circuit-tracer
    does (tokens are kept either way)."""
    scan: str | None = None
    """The graph's scan id (default: the model's name, sanitised)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("node_threshold", "edge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class InterveneConfig:
    """Set or scale features of a traced prompt and compare the model's next tokens and continuation."""

    transcoders: str = field(default="", metadata={"required": True})
    """A transcoder set: the run directory of `train --transcoders`, a circuit-tracer directory, or hf:ORG/REPO."""
    model: str | None = None
    """The host model (default: the one the set names)."""
    edits: list[str] = field(default_factory=list, metadata={"flag": "set", "required": True})
    """A feature edit by graph node id: LAYER_LATENT_POS=VALUE sets it, LAYER_LATENT_POS*FACTOR scales it
    (repeatable)."""
    max_new_tokens: int = 20
    """Tokens of greedy continuation."""
    freeze_attention: bool = False
    """Keep the clean run's attention patterns (circuit-tracer's default; nanosae's runs the model as it is)."""
    constrained_layers: str | None = None
    """Keep these layers' clean MLP outputs, the edits added (all, A-B or L,L,...): effects pass through attention
    and the residual stream only; with all, the change in a logit is the graph's direct edge."""
    device: str = "cpu"
    """Where the model and transcoders run."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be at least 0, got {self.max_new_tokens}")
        check_device(self.device)

    def constrained(self, n_layers: int) -> list[int]:
        """--constrained-layers as layer numbers of a model with n_layers (a ConfigError naming the form)."""
        text = (self.constrained_layers or "").replace(" ", "")
        if not text:
            return []
        if text == "all":
            return list(range(n_layers))
        try:
            if "-" in text:
                first, last = (int(v) for v in text.split("-"))
                layers = list(range(first, last + 1))
            else:
                layers = [int(v) for v in text.split(",")]
        except ValueError:
            layers = []
        if not layers or not all(0 <= L < n_layers for L in layers):
            raise ConfigError(
                f"--constrained-layers {self.constrained_layers!r}: expected all, A-B or L,L,... with layers in "
                f"0..{n_layers - 1}"
            )
        return layers


@dataclass
class ViewConfig:
    """Serve the viewer (or write it as a static site)."""

    port: int = 8000
    """Port to listen on (1..65535)."""
    host: str = "127.0.0.1"
    """Interface to bind (default: this machine only; requests must name localhost or this address, 0.0.0.0 accepts
    any name)."""
    model: str | None = None
    """Host model for 'run text' and steering (default: the SAE's model_name)."""
    export: str | None = None
    """Write a self-contained static site to this new or empty directory (or an earlier export, which is replaced)
    instead of serving."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")


@dataclass
class ExplainConfig:
    """Which explanations `explain` writes into a features.db, and with what."""

    method: str = "n2g"
    """n2g (token patterns), llm (a language model writes, then simulates) or user (your own lines, from
    --explanations, scored as an LLM's are)."""
    explainer_url: str | None = field(default=None, metadata={"envvar": "NANOSAE_EXPLAINER_URL"})
    """OpenAI-compatible endpoint for --method llm (default: the local host model)."""
    explainer_model: str = "gpt-4o-mini"
    """Model name sent to the endpoint."""
    max_features: int = 100
    """--method llm: explain this many of the most frequent features (0 = all)."""
    model: str | None = None
    """Local explainer model (default: the SAE's model_name)."""
    explanations: str | None = None
    """--method user: a JSON file of {"LATENT": "explanation", ...}, each scored on held-out text by the explainer."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method not in ("n2g", "llm", "user"):
            raise ConfigError(f"unknown explanation method {self.method!r}; expected n2g, llm or user")
        if (self.method == "user") != bool(self.explanations):
            raise ConfigError("--method user and --explanations FILE go together")
        check_range("max_features", self.max_features, 0)


@dataclass
class ExportConfig:
    """Where an export goes, and the names Neuronpedia files it under."""

    out: str = field(default="", metadata={"required": True})
    """Output directory."""
    model_id: str | None = None
    """Neuronpedia: the model id (default: the model name)."""
    scan: str | None = None
    """circuit-tracer: the set's scan id (default: the directory's name)."""
    sae_set: str | None = None
    """Neuronpedia: the SAE set name."""


@dataclass
class SourceConfig:
    """Where a run's activations come from: stores on disk (acts), or the host model reading text (streaming)."""

    acts: str | None = None
    """Activation store to train from (made by `nanosae collect`); without it, activations are streamed."""
    acts_out: str | None = None
    """Transcoder from stores: the target hook's store, collected in the same run as acts."""
    crosscoder_acts: list[str] | None = None
    """Crosscoder from stores: one store per hook, collected in one run."""
    model: str = DEFAULT_MODEL
    """Host model for streaming: smollm2-135m, a HF dir / hub name / .gguf, or nanochat:DIR[@STEP]."""
    hook: str = "blocks.15.hook_resid_post"
    """Hook point for streaming."""
    hook_out: str | None = None
    """Transcoder streaming: the hook predicted from hook's activation, e.g. blocks.L.hook_mlp_out."""
    crosscoder_hooks: list[str] | None = None
    """Crosscoder streaming: the hooks read and reconstructed together with one shared latent space."""
    data: DataConfig = field(default_factory=DataConfig)
    """Text to stream through the model (not used with stores)."""
    model_batch_size: int = 8
    """Windows per forward pass when streaming."""
    model_dtype: ModelDtype = "auto"
    """Streaming: the host model's compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)."""
    versus: str | None = None
    """Streaming: a second model (B) read at --hook on the same windows as --model (A), for a model-diffing
    crosscoder over the two (the streamed form of --diff A_STORE B_STORE)."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range("model_batch_size", self.model_batch_size, 1)
        if self.versus and (self.from_stores or self.hook_out or self.crosscoder_hooks):
            raise ConfigError(
                "--versus streams a second model at one hook; with stores use --diff A_STORE B_STORE, and a "
                "diff is neither a transcoder nor a crosscoder over several hooks"
            )
        if (self.hook_out or self.acts_out) and (self.crosscoder_hooks or self.crosscoder_acts):
            raise ConfigError("a run trains either a transcoder (hook_out / acts_out) or a crosscoder, not both")
        if self.acts_out and not self.acts:
            raise ConfigError("acts_out (the transcoder's target store) needs acts (its input store)")

    @property
    def from_stores(self) -> bool:
        return bool(self.acts or self.crosscoder_acts)

    @property
    def transcoder(self) -> bool:
        return bool(self.hook_out or self.acts_out)

    def io(self) -> tuple[list[str], list[str]]:
        """What the run reads and what it reconstructs: store paths (from stores) or hook names (streaming)."""
        if self.from_stores:
            ins = list(self.crosscoder_acts or [str(self.acts)])
            return ins, list(self.crosscoder_acts or [str(self.acts_out or self.acts)])
        if self.versus:  # one hook of two models
            return [self.hook, self.hook], [self.hook, self.hook]
        ins = list(self.crosscoder_hooks or [self.hook])
        return ins, list(self.crosscoder_hooks or [self.hook_out or self.hook])


@dataclass
class DictionaryConfig:
    """The SAE to train; its input width and hooks come from the source."""

    architecture: str = field(default=registry.DEFAULT_ARCHITECTURE, metadata={"aliases": ["--arch"]})
    """relu, topk, batchtopk, jumprelu, gated, matryoshka (nested BatchTopK dictionaries), or another registered
    in nanosae.registry; several train together."""
    d_sae: int = 4608
    """Number of latents; several (2304,4608) train together."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka); several train together."""
    target_l0: float | None = None
    """JumpReLU: the L0 to train towards (Gemma Scope 2's quadratic penalty instead of L0 itself; no sweep of the
    sparsity coefficient needed)."""
    matryoshka_groups: list[int] | None = field(default=None, metadata={"aliases": ["--groups"]})
    """Matryoshka prefix sizes, e.g. 576,1152,2304,4608 (default d_sae/8, /4, /2, d_sae)."""
    normalize_activations: InputNorm = field(default="none", metadata={"aliases": ["--input-norm"]})
    """layer_norm: centre each input and divide by its std, undone on output (OpenAI's TopK SAEs)."""
    skip_connection: bool = False
    """Transcoder: also learn a linear skip map W_skip from input to output."""
    cross_layer: bool = False
    """With --transcoders: cross-layer transcoders, each layer's features also writing to every later MLP output."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range("d_sae", self.d_sae, 1, MAX_LATENTS)
        check_range("k", self.k, 1)
        if self.architecture not in registry.names():
            raise ConfigError(
                f"architecture must be one of {', '.join(registry.names())}, got {_brief(self.architecture)}"
            )
        if self.arch.uses_k and self.k > self.d_sae:
            raise ConfigError(f"k ({self.k}) must be at most d_sae ({self.d_sae})")
        check_range("matryoshka_groups", self.matryoshka_groups, 1, self.d_sae)
        check_target_l0(self.arch, self.target_l0, self.d_sae)

    @property
    def arch(self) -> registry.Architecture:
        return registry.get(self.architecture)

    def sae_config(self, **io: Any) -> SAEConfig:
        """The SAEConfig these settings give for a source's widths and hooks (io: d_in, d_out, hook_name, ...):
        the fields an architecture does not use are left unset."""
        arch = self.arch
        return SAEConfig(
            architecture=self.architecture,
            d_sae=self.d_sae,
            k=self.k if arch.uses_k else None,
            target_l0=self.target_l0,
            matryoshka_groups=self.matryoshka_groups if arch.nested else None,
            normalize_activations=self.normalize_activations,
            skip_connection=self.skip_connection,
            **io,
        )


@dataclass
class OptimConfig:
    """How the SAE is optimised: budget, Adam, schedule, initialisation, sparsity and dead latents.
    Knobs left as None are derived from the budget (see train.schedule.Schedule)."""

    tokens: int = 2_000_000
    """Training tokens (steps = tokens // batch_size); a smaller store is read for several epochs."""
    batch_size: int = field(default=None, metadata={"derived": True})  # type: ignore[assignment]
    """Tokens per optimizer step; default ~tokens/1000 rounded to a power of two, at most 4096."""
    lr: float | None = None
    """Adam learning rate; default 6.63e-4 / sqrt(d_sae / 2^14) × sqrt(batch_size / 1024) (1.25e-3 at d_sae 4608
    and batch 1024, 8.8e-4 at batch 512)."""
    lr_warmup_steps: int | None = None
    """Linear warm-up steps (default 5% of the run)."""
    lr_schedule: LRSchedule = "linear"
    """constant, cosine, or linear decay over the last lr_decay_fraction of the run."""
    lr_decay_fraction: float = 0.2
    """Share of the run over which the learning rate decays to 0 (cosine, linear)."""
    decoder_lr_scale: float | None = None
    """The decoder's (W_dec, b_dec) learning rate as a multiple of lr; default 3 for the TopK family, else 1."""
    refit_decoder: bool | None = None
    """When training ends, set the decoder to the least-squares decoder for the trained encoder's codes on the
    stored activations (default: on for TopK/BatchTopK SAEs up to 8192 latents trained from --acts, without
    kl_finetune; see train.refit)."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's epsilon."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    sparsity_coefficient: float | None = field(default=None, metadata={"aliases": ["--l1-coefficient"]})
    """L1 weight (relu, gated) or L0 weight (jumprelu), default 5.0 / 5.0 / 1.0; several train together."""
    sparsity_warmup_steps: int | None = None
    """Steps over which the sparsity coefficient ramps up from 0 (default 5% of the run)."""
    ema_decay: float | None = None
    """Save an exponential moving average of the weights (e.g. 0.999; its decay is warmed up)."""
    init_b_dec: BDecInit = "geometric_median"
    """geometric_median, mean or zeros."""
    init_encoder_scale: float = 0.5
    """W_enc starts at this times W_dec.T."""
    init_sample_tokens: int = 8192
    """Tokens used to estimate b_dec and the activation scale."""
    scale_activations: bool = True
    """Scale inputs so their mean squared norm is d_in (kept in the SAE as activation_scale)."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing (default tokens/20, at most 10M)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss (default d_in/2)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    resample_every: int | None = None
    """ReLU SAEs: resample dead latents every N steps (default steps/8), in the first half of the run only."""
    norm_weighting: float = 0.0
    """Weight each token's squared error by (‖x‖² / batch mean)^−p: 0 plain MSE, 1 error relative to the norm."""
    k_anneal: float = 0.0
    """TopK family: share of the run over which k falls linearly from k_start to k (0 = k throughout)."""
    k_start: int | None = None
    """Where k_anneal starts (default 4 × k)."""
    kl_finetune: float = 0.0
    """Share of the tokens, at the end, trained on KL(clean ‖ spliced) + MSE through the rest of the model
    (end-to-end fine-tune; lowers the CE-loss gap; each step runs the model twice, see docs/training.md)."""
    kl_coefficient: float | None = None
    """Weight of the KL term in the fine-tune; default: set at its first step so KL weighs kl_balance × MSE."""
    kl_balance: float = 1.0
    """Without kl_coefficient: how many times the MSE the KL term weighs at the fine-tune's first step."""
    encoder_bf16: bool = False
    """TopK/BatchTopK: run the encoder GEMM (the dense part of a step) in bfloat16, as autocast would; weights,
    gradients and Adam state stay float32. For GPUs' tensor cores; on a CPU it is slower."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("tokens", "init_sample_tokens", "dead_tokens", "k_aux", "resample_every"):
            check_range(name, getattr(self, name), 1)
        for name in (
            "lr_warmup_steps",
            "sparsity_warmup_steps",
            "grad_clip",
            "sparsity_coefficient",
            "aux_coefficient",
        ):
            check_range(name, getattr(self, name), 0)
        check_range("lr", self.lr, 0, open_low=True)
        check_range("eps", self.eps, 0, open_low=True)
        check_range("lr_decay_fraction", self.lr_decay_fraction, 0, 1)
        check_range("kl_finetune", self.kl_finetune, 0, 1)
        check_range("decoder_lr_scale", self.decoder_lr_scale, 0, open_low=True)
        check_range("k_anneal", self.k_anneal, 0, 1)
        check_range("norm_weighting", self.norm_weighting, 0, 2)
        check_range("k_start", self.k_start, 1)
        check_range("kl_coefficient", self.kl_coefficient, 0)
        check_range("kl_balance", self.kl_balance, 0, open_low=True)
        for name in ("beta1", "beta2", "ema_decay"):
            check_range(name, getattr(self, name), 0, 1, open_high=True)
        if self.batch_size is None:
            self.batch_size = default_batch_size(self.tokens)
        check_range("batch_size", self.batch_size, 1)
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens ({self.tokens}) must be at least one batch ({self.batch_size})")


@dataclass
class TrainConfig:
    """Train one SAE (or transcoder, crosscoder) into a run directory."""

    out: str = "runs/sae"
    """Run directory: config.json, sae/, checkpoints/, metrics.jsonl."""
    source: SourceConfig = field(default_factory=SourceConfig)
    sae: DictionaryConfig = field(default_factory=DictionaryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    """Initial weights, data order and resampling: the same seed gives the same weights on CPU."""
    log_every: int = 10
    """Log metrics every N steps."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (0 = only at the end and on Ctrl-C)."""
    resume: bool = False
    """Continue the run in out/ from its newest checkpoint (same settings only)."""
    tensorboard: bool = False
    """Also log metrics to out/tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (needs wandb; project from WANDB_PROJECT, default nanosae)."""
    device: str = "cpu"
    """Where the SAE trains: cpu, cuda, cuda:1, ..."""
    shard_latents: int = 0
    """Under torchrun: split the latents over N processes (each holds d_sae/N latents and their Adam state;
    TopK only); world/N replicas of them train data-parallel. 0: every process holds the whole SAE."""
    distribute_saes: bool = False
    """Under torchrun, with several SAEs from one stream: each process trains its share of the SAEs whole on
    every batch (as sparsify's distribute_modules), instead of every SAE on a slice of each batch."""

    def __post_init__(self) -> None:
        check_fields(self)
        check_range("log_every", self.log_every, 1)
        check_range("checkpoint_every", self.checkpoint_every, 0)
        check_range("shard_latents", self.shard_latents, 0)
        check_range("seed", self.seed, 0, MAX_SEED)
        check_device(self.device)
        if self.optim.k_start is not None and self.sae.arch.uses_k:
            check_range("k_start", self.optim.k_start, self.sae.k, self.sae.d_sae)
        if self.sae.skip_connection and not self.source.transcoder:
            raise ConfigError("skip_connection is for transcoders (give hook_out or acts_out)")

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """From flat settings, each routed to the part that owns its name (the CLI's flags are these names):
        TrainConfig.build(acts="runs/acts", d_sae=4608, k=32, tokens=600_000)."""
        return build_nested(cls, values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a saved config.json: nested as written now, or flat as older versions wrote it."""
        if isinstance(d.get("optim"), dict):
            flat = {k: v for part in PARTS if isinstance(d.get(part), dict) for k, v in d[part].items()}
            flat |= {k: v for k, v in d.items() if k not in PARTS}
        else:
            flat = {_OLD_TRAIN_NAMES.get(k, k): v for k, v in d.items()}
        flat = {k: v for k, v in flat.items() if k in {name for name, _, _ in config_leaves(cls)}}
        if isinstance(flat.get("data"), dict):
            flat["data"] = DataConfig.from_dict(flat["data"])
        return cls.build(**flat)


_OLD_TRAIN_NAMES = {"input_norm": "normalize_activations", "normalize_activations": "scale_activations"}
PARTS = {"source": SourceConfig, "sae": DictionaryConfig, "optim": OptimConfig}


def config_leaves(cls: type) -> list[tuple[str, str | None, dataclasses.Field]]:
    """(name, the part it lives in or None, field) of every setting of a config, in field order. A field
    typed by one of PARTS is walked into; anything else (DataConfig included) is one setting."""
    out: list[tuple[str, str | None, dataclasses.Field]] = []
    for f in dataclasses.fields(cls):
        if f.name in PARTS and f.type == PARTS[f.name].__name__:
            out += [(g.name, f.name, g) for g in dataclasses.fields(PARTS[f.name])]
        else:
            out.append((f.name, None, f))
    return out


def build_nested(cls: type, values: dict[str, Any]) -> Any:
    """cls(**values) with every value routed to the part (source, sae, optim) whose field it names."""
    leaves = config_leaves(cls)
    known = {name for name, _, _ in leaves}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} for {cls.__name__}; expected one of {', '.join(sorted(known))}"
        )
    parts: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, part, _ in leaves:
        if name in values:
            (parts.setdefault(part, {}) if part else top)[name] = values[name]
    return cls(
        **top,
        **{
            part: PARTS[part](**parts.get(part, {}))
            for part in PARTS
            if part in {f.name for f in dataclasses.fields(cls)}
        },
    )


def flat_settings(cfg: Any) -> dict[str, Any]:
    """name -> value of every setting of a nested config (the inverse of build_nested), DataConfig as a dict."""
    out = {}
    for name, part, _ in config_leaves(type(cfg)):
        value = getattr(getattr(cfg, part) if part else cfg, name)
        is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
        out[name] = dataclasses.asdict(value) if is_instance else value
    return out
