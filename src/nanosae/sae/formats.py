"""SAE files: our own (= SAELens layout), SAELens's (incl. older key names), OpenAI sparse_autoencoder .pt, and
the field's other formats through sae/foreign.py (sparsify).

SAELens layout: a directory with cfg.json + sae_weights.safetensors (W_enc, b_enc, W_dec, b_dec and
threshold / b_gate, r_mag, b_mag where the architecture has them).

OpenAI's Autoencoder state dict: pre_bias (d_in), latent_bias (d_sae), encoder.weight (d_sae, d_in),
decoder.weight (d_in, d_sae), an `activation` class name (ReLU / TopK) with activation_state_dict
({k, postact_fn}), and statistics buffers we ignore. Its forward is
  latents = act(encoder(x - pre_bias) + latent_bias); recons = decoder(latents) + pre_bias
with LN-style input normalisation when the model was built with normalize=True, which its own
from_state_dict infers from the activation being TopK. We do the same unless told otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanosae.config import TORCH_DTYPES, SAEConfig
from nanosae.errors import ConfigError, FormatError, first_line
from nanosae.io import atomic_write, read_json, regular_file, write_json
from nanosae.sae import foreign
from nanosae.sae.architectures import JUMPRELU, RELU, TOPK
from nanosae.sae.foreign import build_checked

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"

# Older SAELens releases spelled some keys differently.
_OLD_KEYS = {"hook_point": "hook_name", "d_model": "d_in", "dict_size": "d_sae"}
_OLD_ARCHITECTURES = {"standard": RELU.name}
# SAELens names transcoders by architecture; ours keep the activation and mark the transcoder by hook_name_out.
_TRANSCODERS = {
    "transcoder": (RELU.name, False),
    "skip_transcoder": (RELU.name, True),
    "jumprelu_transcoder": (JUMPRELU.name, False),
}
# Normalisations that leave nothing to do at inference (the factor is folded into the weights).
_INERT_NORMALIZATIONS = {None, "none", "expected_average_only_in"}


def save_sae(sae: Any, path: str | Path, sparsity: torch.Tensor | None = None) -> Path:
    """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors) into directory path, atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    atomic_write(path / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    if sparsity is not None:
        atomic_write(path / SPARSITY_FILE, lambda p: save_file({"sparsity": sparsity.contiguous().cpu()}, str(p)))
    write_json(path / CFG_FILE, saelens_cfg(sae.cfg))
    return path


def saelens_cfg(cfg: SAEConfig) -> dict[str, Any]:
    """Our config plus the extra keys older SAELens readers require."""
    d = cfg.to_dict()
    d["hook_layer"] = hook_layer(cfg.hook_name)
    d["hook_head_index"] = None
    if cfg.kind == "transcoder":
        d["hook_layer_out"], d["hook_head_index_out"] = hook_layer(cfg.hook_name_out), None
        names = {(act, skip): name for name, (act, skip) in _TRANSCODERS.items()}
        if not cfg.apply_b_dec_to_input:  # SAELens's transcoder names mean "b_dec is not subtracted" to its readers
            d["architecture"] = names.get((cfg.architecture, cfg.skip_connection), cfg.architecture)
    d["prepend_bos"] = True
    if cfg.k is not None:
        d["activation_fn_kwargs"] = {"k": cfg.k}
    return d


def hook_layer(hook: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def load_sae(path: str | Path, *, build: Any, device: str = "cpu", normalize: bool | None = None) -> Any:
    """An SAE from any of the formats above, made by `build(cfg)` (SAE.load passes the SAE class: this module
    never imports the model, so the model can import it)."""
    path = foreign.resolve_hub(str(path)) if foreign.is_hub(path) else Path(path)
    if not path.exists():
        raise FormatError(f"SAE file not found: {path}")
    if foreign.is_dictionary_learning(path):
        return foreign.load_dictionary_learning(path, device, build)
    if foreign.is_gemma_scope(path):
        return foreign.load_gemma_scope(path, device, build)
    if path.is_dir() and foreign.is_sparsify(path):
        return foreign.load_sparsify(path, device, build)
    if path.is_dir() and not (path / CFG_FILE).exists() and foreign.sparsify_hookpoints(path):
        raise FormatError(
            f"{path} is a sparsify checkpoint of several sparse coders; give one hookpoint folder: "
            + ", ".join(str(path / h) for h in foreign.sparsify_hookpoints(path)[:8])
        )
    if path.is_dir():
        return _load_saelens_dir(path, device, build)
    if path.name == WEIGHTS_FILE or path.name == CFG_FILE:
        return _load_saelens_dir(path.parent, device, build)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_openai(path, device, normalize, build)
    raise FormatError(f"{path}: not an SAE (expected a directory with {CFG_FILE} or an OpenAI .pt state dict)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FormatError(f"{path} is missing (an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE})")
    return read_json(path)


def _saelens_config(raw: dict[str, Any], where: Path) -> SAEConfig:
    """Our SAEConfig from a cfg.json of ours or of any SAELens release; every error names the file."""
    try:
        return _saelens_fields(raw, where)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _saelens_fields(raw: dict[str, Any], where: Path) -> SAEConfig:
    d = dict(_dict(raw.get("metadata")))  # SAELens v6 moves model/hook facts into metadata
    d.update({k: v for k, v in raw.items() if k != "metadata"})
    for old, new in _OLD_KEYS.items():
        if old in d and new not in d:
            d[new] = d[old]
    for key in ("architecture", "normalize_activations", "activation_fn_str", "dtype"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"{key} must be a string, got {d[key]!r:.40}")
    kwargs = _dict(d.get("activation_fn_kwargs"))
    arch = d.get("architecture") or "standard"
    if d.get("activation_fn_str") == TOPK.name or (arch == "standard" and kwargs.get("k")):
        arch = TOPK.name
    d["architecture"] = _OLD_ARCHITECTURES.get(arch, arch)
    if d["architecture"] in _TRANSCODERS:
        d["architecture"], d["skip_connection"] = _TRANSCODERS[d["architecture"]]
        d["apply_b_dec_to_input"] = False
    if d.get("k") is None and kwargs.get("k") is not None:
        d["k"] = kwargs["k"]
    norm = d.get("normalize_activations")
    if norm in _INERT_NORMALIZATIONS:
        d["normalize_activations"] = "none"
    elif norm != "layer_norm":
        raise ConfigError(f"normalize_activations={norm!r} is not supported (expected none or layer_norm)")
    d["dtype"] = str(d.get("dtype") or "float32").replace("torch.", "")
    d["device"] = "cpu"
    for key in ("hook_name", "model_name", "dataset_path"):
        d[key] = d.get(key) or ""
    for key in ("d_in", "d_sae"):
        if key not in d:
            raise FormatError(f"{where}: missing required key {key!r}")
    return SAEConfig.from_dict(d)


def _load_saelens_dir(path: Path, device: str, build: Any) -> Any:
    cfg = _saelens_config(_read_json(path / CFG_FILE), path / CFG_FILE)
    weights = regular_file(path / WEIGHTS_FILE)  # a FIFO would block the reader forever
    if not weights.exists():
        raise FormatError(f"{weights} is missing (an SAE directory needs {CFG_FILE} and {WEIGHTS_FILE})")
    _check_header(cfg, weights)  # before anything is allocated: cfg.json may claim a huge d_sae
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{weights} is corrupt or truncated: {e}") from None
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    # the tensors view safetensors' copy-on-write mapping of the file: assigned, not copied, a large SAE or
    # transcoder is read page by page as it is used, and the OS can drop the pages again
    return build_checked(cfg, tensors, weights, device, build, assign=True)


def _check_header(cfg: SAEConfig, weights: Path) -> None:
    """The file's W_enc / W_dec shapes (read from its header) agree with cfg.json."""
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{weights} is corrupt or truncated: {e}") from None
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_out)}
    for name, shape in expected.items():
        if name not in shapes:
            raise FormatError(f"{weights}: missing tensor {name}")
        if shapes[name] != shape:
            raise FormatError(
                f"{weights}: tensor {name} has shape {shapes[name]}, expected {shape} "
                f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out} (cfg.json)"
            )


def _load_openai(path: Path, device: str, normalize: bool | None, build: Any) -> Any:
    try:
        sd = torch.load(regular_file(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated/corrupt/unsafe files
        why = first_line(e)
        raise FormatError(f"{path} could not be read as a torch state dict: {why}") from None
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: expected an OpenAI sparse_autoencoder state dict, got {type(sd).__name__}")
    needed = ["pre_bias", "latent_bias", "encoder.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise FormatError(f"{path}: not an OpenAI sparse_autoencoder state dict (missing {', '.join(missing)})")
    for key in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight", "decoder.linear.weight"):
        if key in sd and not isinstance(sd[key], torch.Tensor):
            raise FormatError(f"{path}: {key} is a {type(sd[key]).__name__}, expected a tensor")
    enc_FD = sd["encoder.weight"]
    if enc_FD.dim() != 2:
        raise FormatError(f"{path}: encoder.weight has shape {tuple(enc_FD.shape)}, expected (d_sae, d_in)")
    if not enc_FD.is_floating_point():
        raise FormatError(
            f"{path}: encoder.weight holds {str(enc_FD.dtype).replace('torch.', '')} values, expected floats"
        )
    d_sae, d_in = enc_FD.shape
    dec_DF = sd.get("decoder.weight")
    if dec_DF is None and "decoder.linear.weight" in sd:  # tied: TiedTranspose wraps the encoder
        dec_DF = enc_FD.T
    if dec_DF is None:
        raise FormatError(f"{path}: missing decoder.weight")
    if dec_DF.shape != (d_in, d_sae):
        raise FormatError(f"{path}: decoder.weight has shape {tuple(dec_DF.shape)}, expected {(d_in, d_sae)}")
    activation = sd.get("activation", "ReLU")
    act_state = sd.get("activation_state_dict")
    act_state = {} if act_state is None else act_state
    if not isinstance(activation, str):
        raise FormatError(f"{path}: activation is a {type(activation).__name__}, expected a class name (ReLU or TopK)")
    if not isinstance(act_state, dict):
        raise FormatError(f"{path}: activation_state_dict is a {type(act_state).__name__}, expected a dict")
    if activation == "TopK":
        k = act_state.get("k", sd.get("activation.k"))
        postact = act_state.get("postact_fn", sd.get("activation.postact_fn", "ReLU"))
        if isinstance(k, torch.Tensor) and k.numel() == 1:
            k = k.item()
        if k is None or isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae:
            raise FormatError(f"{path}: TopK activation needs an integer k in 1..{d_sae}, got {k!r:.40}")
        if postact != "ReLU":
            raise FormatError(f"{path}: TopK with postact_fn {postact!r:.40} is not supported (expected ReLU)")
        arch = TOPK.name
    elif activation == "ReLU":
        arch, k = RELU.name, None
    else:
        raise FormatError(f"{path}: activation {activation!r:.40} is not supported (expected ReLU or TopK)")
    if normalize is None:
        normalize = activation == "TopK"  # what OpenAI's own from_state_dict infers
    dtype = next((name for name, dt in TORCH_DTYPES.items() if dt == enc_FD.dtype), "float32")
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture=arch,
        k=None if k is None else int(k),
        normalize_activations="layer_norm" if normalize else "none",
        dtype=dtype,
    )
    tensors = {"W_enc": enc_FD.T, "b_enc": sd["latent_bias"], "W_dec": dec_DF.T, "b_dec": sd["pre_bias"]}
    return build_checked(cfg, {n: t.contiguous() for n, t in tensors.items()}, path, device, build)
