"""circuit-tracer's transcoder sets, read so its pretrained sets trace in nanosae (export/circuit_tracer.py writes
nanosae's sets in the same layout).

The layout (circuit-tracer 0.5, `utils/caching.py` and the Hub repositories it loads): a directory with
config.yaml {model_kind: transcoder_set | cross_layer_transcoder, feature_input_hook, feature_output_hook, scan,
optional model_name, optional transcoders: [one file per layer, hf:// or a path]} and
- per-layer (PLT): layer_{L}.safetensors with W_enc (d_sae, d_model), W_dec (d_sae, d_model), b_enc, b_dec,
  optional activation_function.threshold (JumpReLU, else ReLU) and W_skip (d_model, d_model); or, named by the
  config's list, Gemma Scope params.npz (W_enc (d_model, d_sae), threshold) and Gemma Scope 2 safetensors (w_enc,
  w_dec, threshold, optional affine_skip_connection (d_model, d_model));
- cross-layer (CLT): W_enc_{L}.safetensors {W_enc_L, b_enc_L, b_dec_L, optional threshold_L} and
  W_dec_{L}.safetensors {W_dec_L (d_sae, n_layers - L, d_model)}: layer L's features write to L, L+1, ...

Its transcoders compute z = act(x W_encᵀ + b_enc), y = z W_dec + b_dec + x W_skipᵀ, with no input scaling and no
b_dec subtracted from the input: nanosae's transcoder with apply_b_dec_to_input off (on export,
export.saelens.fold_scales folds our scales into that form). feature_input_hook names TransformerLens's hook in
each block: ln2.hook_normalized and mlp.hook_in are the MLP's normed input, hook_resid_mid the residual stream
before that norm; hook_mlp_out and mlp.hook_out the MLP's output.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from nanosae.config import SAEConfig
from nanosae.errors import FormatError, first_line
from nanosae.io import is_number, regular_file
from nanosae.sae import SAE
from nanosae.sae.architectures import JUMPRELU, RELU
from nanosae.sae.foreign import build_checked, read_npz, resolve_hub

CONFIG = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
READS = {
    "ln2.hook_normalized": "ln2.hook_normalized",
    "mlp.hook_in": "ln2.hook_normalized",
    "hook_resid_mid": "hook_resid_mid",
}
WRITES = {"hook_mlp_out": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out"}
MAX_LAYERS = 1024


def is_circuit_tracer(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(path: Path) -> dict[str, Any]:
    """config.yaml, checked: a known model_kind and hooks nanosae can place."""
    import yaml

    file = regular_file(path / CONFIG)
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FormatError(f"{file} is not valid YAML: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{file}: expected a mapping of settings, got {type(config).__name__}")
    if config.get("model_kind") not in KINDS:
        raise FormatError(f"{file}: model_kind must be one of {', '.join(KINDS)}, got {config.get('model_kind')!r:.40}")
    for key, known in (("feature_input_hook", READS), ("feature_output_hook", WRITES)):
        if config.get(key) not in known:
            raise FormatError(f"{file}: {key} {config.get(key)!r:.40} is not one nanosae places ({', '.join(known)})")
    listed = config.get("transcoders")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(p, str) for p in listed)):
        raise FormatError(f"{file}: transcoders must be a list of file names, one per layer")
    if not isinstance(config.get("model_name", ""), str):
        raise FormatError(f"{file}: model_name must be a string")
    return config


def _inside(path: Path, name: str) -> Path:
    """A file the config names: hf://ORG/REPO/FILE through the Hub cache, else a relative path inside the set."""
    if name.startswith("hf://"):
        return resolve_hub("hf:" + name.removeprefix("hf://").split("@")[0])
    target = (path / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(path.resolve()):
        raise FormatError(f"{path / CONFIG}: {name!r:.60} is outside the set's directory")
    return target


def _numbered(path: Path, pattern: str) -> list[Path]:
    """The files PREFIX_{L}.safetensors for L = 0, 1, ... (circuit-tracer needs every layer from 0)."""
    found = {}
    for f in path.glob(pattern.format("*")):
        number = f.name.removeprefix(pattern.split("{")[0]).removesuffix(".safetensors")
        if is_number(number) and int(number) < MAX_LAYERS:
            found[int(number)] = f
    if not found:
        raise FormatError(f"{path}: no {pattern.format('L')} files, which its config.yaml's model_kind needs")
    if sorted(found) != list(range(len(found))):
        missing = min(set(range(max(found) + 1)) - set(found))
        raise FormatError(f"{path}: {pattern.format(missing)} is missing (layers run from 0 without gaps)")
    return [found[L] for L in range(len(found))]


def _tensors(file: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors (memory-mapped) or (Gemma Scope) .npz file, read without pickle; all of them,
    or `keys`."""
    try:
        if file.suffix == ".npz":
            return {k: torch.from_numpy(a) for k, a in read_npz(file).items() if keys is None or k in keys}
        # safetensors maps the file and its tensors view the mapping: nothing is read until used, and the OS can
        # drop the pages again, so a set of large transcoders need not fit in memory
        with safe_open(str(regular_file(file)), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}  # noqa: SIM118
    except FormatError:
        raise
    except (SafetensorError, OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise FormatError(f"{file} is corrupt or truncated: {first_line(e)}") from None


def _per_layer(file: Path) -> dict[str, torch.Tensor]:
    """One layer's tensors in nanosae's names and shapes (W_enc (d_model, d_sae), W_skip applied as x W_skipᵀ)."""
    t = _tensors(file)
    if "w_enc" in t:  # Gemma Scope 2: w_enc (d_model, d_sae), affine_skip_connection (d_in, d_out) applied as x A
        names = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
        out = {ours: t[theirs] for ours, theirs in names.items() if theirs in t}
        if "affine_skip_connection" in t:
            out["W_skip"] = t["affine_skip_connection"].T
    elif file.suffix == ".npz":  # Gemma Scope: W_enc (d_model, d_sae)
        out = {k: t[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if k in t}
    else:  # circuit-tracer's own: W_enc (d_sae, d_model)
        out = {k: t[k] for k in ("W_dec", "b_enc", "b_dec", "W_skip") if k in t}
        if "W_enc" in t:
            out["W_enc"] = t["W_enc"].T
        if "activation_function.threshold" in t:
            out["threshold"] = t["activation_function.threshold"]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if name not in out or out[name].dim() != (2 if name.startswith("W") else 1):
            raise FormatError(f"{file}: missing or misshapen {name} (not a circuit-tracer transcoder?)")
    return {k: v if v.dtype == torch.float32 else v.float() for k, v in out.items()}


def _sae(tensors: dict[str, torch.Tensor], layer: int, reads: str, file: Path, model: str, device: str) -> SAE:
    d_model, d_sae = tensors["W_enc"].shape
    cfg = SAEConfig(
        d_in=int(d_model),
        d_sae=int(d_sae),
        architecture=JUMPRELU.name if "threshold" in tensors else RELU.name,
        hook_name=f"blocks.{layer}.{reads}",
        hook_name_out=f"blocks.{layer}.hook_mlp_out",
        d_out=int(tensors["b_dec"].shape[0]),
        apply_b_dec_to_input=False,
        skip_connection="W_skip" in tensors,
        model_name=model,
    )
    return build_checked(cfg, tensors, file, device, SAE, assign=True).eval()


def load(path: Path, device: str = "cpu") -> tuple[str, dict[int, SAE], dict[int, torch.Tensor]]:
    """(the model the config names, or "", each layer's transcoder, each layer's decoders to the later layers
    (cross-layer sets: (d_sae, n_later, d_model))) from a circuit-tracer directory."""
    config = read_config(path)
    reads, model = READS[config["feature_input_hook"]], config.get("model_name", "")
    by_layer: dict[int, SAE] = {}
    later: dict[int, torch.Tensor] = {}
    if config["model_kind"] == "transcoder_set":
        listed = config.get("transcoders")
        files = [_inside(path, name) for name in listed] if listed else _numbered(path, "layer_{}.safetensors")
        for layer, file in enumerate(files):
            by_layer[layer] = _sae(_per_layer(file), layer, reads, file, model, device)
        return model, by_layer, later
    encoders, decoders = _numbered(path, "W_enc_{}.safetensors"), _numbered(path, "W_dec_{}.safetensors")
    n = len(encoders)
    if len(decoders) != n:
        raise FormatError(f"{path}: {n} W_enc files but {len(decoders)} W_dec files")
    for layer, (enc_file, dec_file) in enumerate(zip(encoders, decoders)):
        enc = _tensors(enc_file)
        dec = _tensors(dec_file, [f"W_dec_{layer}"]).get(f"W_dec_{layer}")
        if dec is None or dec.dim() != 3 or dec.shape[1] != n - layer:
            got = "nothing" if dec is None else f"shape {tuple(dec.shape)}"
            raise FormatError(f"{dec_file}: W_dec_{layer} must be (d_sae, {n - layer}, d_model), got {got}")
        names = {"W_enc": f"W_enc_{layer}", "b_enc": f"b_enc_{layer}", "b_dec": f"b_dec_{layer}"}
        missing = [theirs for theirs in names.values() if theirs not in enc]
        if missing:
            raise FormatError(f"{enc_file}: missing tensor {missing[0]}")
        tensors = {ours: enc[theirs].float() for ours, theirs in names.items()}
        tensors["W_enc"] = tensors["W_enc"].T.contiguous()
        if f"threshold_{layer}" in enc:
            tensors["threshold"] = enc[f"threshold_{layer}"].float().flatten()
        tensors["W_dec"] = dec[:, 0].float().contiguous()
        by_layer[layer] = _sae(tensors, layer, reads, enc_file, model, device)
        if layer < n - 1:
            later[layer] = dec[:, 1:].float().to(device)
    return model, by_layer, later


def scan_name(text: str) -> str:
    """A scan id Neuronpedia accepts: letters, digits and dashes (a Hub name's slash and dots become dashes)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "nanosae"
