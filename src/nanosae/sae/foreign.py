"""Dictionaries other tools trained, read into nanosae's SAE: EleutherAI's sparsify, Google's Gemma Scope and
dictionary_learning's.

sparsify (SparseCoder.save_to_disk): one folder per hookpoint holding cfg.json ({activation, num_latents or
expansion_factor, k, transcode, skip_connection, multi_topk, d_in, ...}) and sae.safetensors (encoder.weight
(d_sae, d_in), encoder.bias, W_dec (d_sae, d_in), b_dec, optional W_skip (d_in, d_in)). Its forward is
  z = topk(relu((x - b_dec) W_encᵀ + b_enc))     (a transcoder does not subtract b_dec)
  y = z W_dec + b_dec (+ x W_skipᵀ)
which is nanosae's TopK SAE (transcoder) with W_enc = encoder.weightᵀ. Hookpoints are module paths of the
Hugging Face model (`layers.6`, `model.layers.6.mlp`); they map onto nanosae's hook names below.

Gemma Scope (params.npz, as in google/gemma-scope-*): W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc, b_dec,
threshold (d_sae); a JumpReLU SAE that does not subtract b_dec from its input:
  z = pre · 1[pre > threshold],  pre = x W_enc + b_enc;   x̂ = z W_dec + b_dec
The release lays files out as REPO/layer_L/width_W/average_l0_N/params.npz, with the site in the repository's
name (gemma-scope-2b-pt-res, -mlp, -att): those give the hook. gemma-scope-2b-pt-transcoders holds transcoders of
the same form, from the MLP's normed input to its output (circuit-tracer's hooks for them).

dictionary_learning (its trainers save ae.pt, the state dict, and config.json with {"trainer": {"dict_class",
"activation_dim", "dict_size", "k", "layer", "lm_name", "submodule_name", ...}}): each class's parameters map onto
nanosae's names (DL_CLASSES); every class but JumpReluAutoEncoder subtracts b_dec from its input. As its
from_pretrained does, AutoEncoder's decoder columns are scaled to unit norm with the encoder scaled to match
(the reconstruction is unchanged); BatchTopK and Matryoshka run on their inference threshold.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanosae import registry
from nanosae.config import SAEConfig
from nanosae.errors import FormatError, first_line
from nanosae.io import read_json, regular_file
from nanosae.sae.architectures import BATCHTOPK, GATED, JUMPRELU, MATRYOSHKA, RELU, TOPK

SPARSIFY_WEIGHTS = "sae.safetensors"
_PREFIXES = ("model.", "gpt_neox.", "transformer.", "base_model.model.")


def is_sparsify(path: Path) -> bool:
    return (path / SPARSIFY_WEIGHTS).exists() and (path / "cfg.json").exists()


def sparsify_hookpoints(path: Path) -> list[str]:
    """The hookpoint folders of a sparsify checkpoint root (each a sparse coder)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and is_sparsify(p)) if path.is_dir() else []


def hook_names(module: str, transcoder: bool) -> tuple[str, str | None]:
    """(hook read, hook written or None) of a sparsify hookpoint: `layers.L` is the residual stream after block
    L; `layers.L.mlp` the MLP's output for an SAE, and for a transcoder its input (after the second norm) and
    output; `layers.L.self_attn` / `.attention` the attention output. Other names are kept as they are."""
    for prefix in _PREFIXES:
        module = module.removeprefix(prefix)
    module = re.sub(r"^(h|blocks|layer)\.(\d+)", r"layers.\2", module)
    m = re.fullmatch(r"layers\.(\d+)(?:\.(mlp|self_attn|attention|attn))?", module)
    if not m:
        return module, module if transcoder else None
    layer, part = m.group(1), m.group(2)
    if part is None:
        return f"blocks.{layer}.hook_resid_post", (f"blocks.{layer}.hook_resid_post" if transcoder else None)
    out = f"blocks.{layer}.hook_mlp_out" if part == "mlp" else f"blocks.{layer}.hook_attn_out"
    if not transcoder:
        return out, None
    return (f"blocks.{layer}.ln2.hook_normalized" if part == "mlp" else f"blocks.{layer}.hook_resid_pre"), out


def load_sparsify(path: Path, device: str, build: Any) -> Any:
    """A sparsify sparse coder (SAE or transcoder, with or without skip) as nanosae's TopK SAE."""
    cfg_path = path / "cfg.json"
    raw = read_json(cfg_path)
    if raw.get("activation", TOPK.name) != TOPK.name:  # sparsify's name for it is ours
        raise FormatError(
            f"{cfg_path}: activation {raw.get('activation')!r} is not supported (nanosae reads "
            "sparsify's topk sparse coders)"
        )
    d_in, k = raw.get("d_in"), raw.get("k")
    num_latents: Any = raw.get("num_latents") or (
        d_in * raw.get("expansion_factor", 32) if isinstance(d_in, int) else None
    )
    for name, value in (("d_in", d_in), ("k", k), ("num_latents", num_latents)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FormatError(f"{cfg_path}: {name} must be a positive integer, got {str(value)[:40]!r}")
    weights = regular_file(path / SPARSIFY_WEIGHTS)
    try:
        t = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{weights} is corrupt or truncated: {first_line(e)}") from None
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in t]
    if missing:
        raise FormatError(f"{weights}: missing tensor {missing[0]} (not a sparsify sparse coder?)")
    transcoder, skip = bool(raw.get("transcode")), "W_skip" in t
    hook_in, hook_out = hook_names(path.name, transcoder or skip)
    d_out = t["W_dec"].shape[-1] if t["W_dec"].dim() == 2 else 0
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=num_latents,
        architecture=TOPK.name,
        k=k,
        dtype=str(t["encoder.weight"].dtype).replace("torch.", ""),
        hook_name=hook_in,
        hook_name_out=hook_out or "",
        d_out=d_out if hook_out else d_in,
        apply_b_dec_to_input=not transcoder,
        skip_connection=skip,
    )
    tensors = {
        "W_enc": t["encoder.weight"].T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    } | ({"W_skip": t["W_skip"]} if skip else {})
    return build_checked(cfg, tensors, weights, device, build)


GEMMA_SCOPE_FILE = "params.npz"
# the repository's site -> (hook read, hook written: transcoders only)
_GEMMA_SITES = {
    "res": ("hook_resid_post", ""),
    "mlp": ("hook_mlp_out", ""),
    "att": ("attn.hook_z", ""),
    "transcoders": ("ln2.hook_normalized", "hook_mlp_out"),
}


def is_gemma_scope(path: Path) -> bool:
    return path.name == GEMMA_SCOPE_FILE or (path.is_dir() and (path / GEMMA_SCOPE_FILE).exists())


def gemma_scope_hooks(path: Path) -> tuple[str, str]:
    """(blocks.L.SITE read, blocks.L.SITE written or "") from a Gemma Scope path: layer_L below a gemma-scope-*-res /
    -mlp / -att repository, or -transcoders (the MLP's normed input to its output), as downloaded or in the Hugging
    Face cache; ("", "") when the path does not say."""
    parts = [p.lower() for p in Path(os.path.abspath(path)).parts]  # not resolved: a cache's links name blobs
    layer = next((m.group(1) for p in reversed(parts) if (m := re.fullmatch(r"layer_(\d+)", p))), None)
    site = next(
        (s for p in reversed(parts) for s in _GEMMA_SITES if re.search(rf"gemma-scope-[^/]*-{s}(?:$|[-_])", p)), None
    )
    if layer is None or not site:
        return "", ""
    read, written = _GEMMA_SITES[site]
    return f"blocks.{layer}.{read}", f"blocks.{layer}.{written}" if written else ""


def read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz file, read without pickle (a one-line FormatError naming the file otherwise); arrays
    stored uncompressed (np.savez, as Gemma Scope's are) are mapped copy-on-write, not read."""
    try:
        with zipfile.ZipFile(regular_file(file)) as archive, open(file, "rb") as raw:
            mapped = {
                info.filename.removesuffix(".npy"): _mapped_member(file, raw, info)
                for info in archive.infolist()
                if info.compress_type == zipfile.ZIP_STORED and info.filename.endswith(".npy")
            }
        with np.load(regular_file(file), allow_pickle=False) as npz:
            return {name: _or_read(mapped.get(name), npz, name) for name in npz.files}
    except FileNotFoundError:
        raise FormatError(f"{file} is missing") from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise FormatError(f"{file} is not a readable .npz: {first_line(e)}") from None


def _or_read(mapped: np.ndarray | None, npz: Any, name: str) -> np.ndarray:
    return mapped if mapped is not None else np.array(npz[name])


def _mapped_member(file: Path, raw: Any, info: zipfile.ZipInfo) -> np.ndarray | None:
    """An uncompressed .npy member of a zip as a copy-on-write memory map (None when it cannot be: object arrays,
    empty ones)."""
    raw.seek(info.header_offset)
    local = raw.read(30)  # the local header: its name and extra lengths can differ from the central directory's
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: bad local header")
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    raw.seek(start)
    fmt = np.lib.format
    reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(raw))
    if reader is None:
        return None
    shape, fortran, dtype = reader(raw)
    if dtype.hasobject or 0 in shape or not shape:
        return None
    if raw.tell() - start + dtype.itemsize * int(np.prod(shape)) > info.file_size:
        raise ValueError(f"member {info.filename} is truncated")
    return np.memmap(file, dtype, "c", raw.tell(), shape, "F" if fortran else "C")


def load_gemma_scope(path: Path, device: str, build: Any) -> Any:
    """A Gemma Scope JumpReLU SAE (params.npz, read without pickle)."""
    file = path if path.name == GEMMA_SCOPE_FILE else path / GEMMA_SCOPE_FILE
    arrays = read_npz(file)
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if n not in arrays]
    if missing or arrays["W_enc"].ndim != 2:
        raise FormatError(f"{file}: missing {missing[0] if missing else 'a 2-d W_enc'} (not a Gemma Scope SAE?)")
    d_in, d_sae = arrays["W_enc"].shape
    tensors = {  # mapped float32 arrays stay mapped (assigned below, not copied)
        name: torch.from_numpy(np.asarray(a.astype(np.float32, copy=False)))
        for name, a in arrays.items()
        if name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    }
    release = re.search(r"gemma-scope-(2b|9b|27b)-(pt|it)", os.path.abspath(file).lower())
    model = f"google/gemma-2-{release.group(1)}{'-it' if release.group(2) == 'it' else ''}" if release else ""
    hook, hook_out = gemma_scope_hooks(file)
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture=JUMPRELU.name,
        hook_name=hook,
        hook_name_out=hook_out,
        d_out=int(tensors["W_dec"].shape[-1]),
        apply_b_dec_to_input=False,
        model_name=model,
    )
    return build_checked(cfg, tensors, file, device, build, assign=True)


DL_FILE = "ae.pt"
# dict_class -> (architecture, {nanosae name: (their name, transpose)})
_LINEAR = {
    "W_enc": ("encoder.weight", True),
    "b_enc": ("encoder.bias", False),
    "W_dec": ("decoder.weight", True),
    "b_dec": ("b_dec", False),
}
_PLAIN = {"W_enc": ("W_enc", False), "b_enc": ("b_enc", False), "W_dec": ("W_dec", False), "b_dec": ("b_dec", False)}
DL_CLASSES = {
    "AutoEncoder": (RELU.name, _LINEAR | {"b_dec": ("bias", False)}),
    "AutoEncoderTopK": (TOPK.name, _LINEAR),
    "BatchTopKSAE": (BATCHTOPK.name, _LINEAR | {"threshold": ("threshold", False)}),
    "MatryoshkaBatchTopKSAE": (MATRYOSHKA.name, _PLAIN | {"threshold": ("threshold", False)}),
    "JumpReluAutoEncoder": (JUMPRELU.name, _PLAIN | {"threshold": ("threshold", False)}),
    "GatedAutoEncoder": (
        GATED.name,
        {
            "W_enc": ("encoder.weight", True),
            "W_dec": ("decoder.weight", True),
            "b_dec": ("decoder_bias", False),
            "b_gate": ("gate_bias", False),
            "r_mag": ("r_mag", False),
            "b_mag": ("mag_bias", False),
        },
    ),
}


def is_dictionary_learning(path: Path) -> bool:
    """ae.pt with the trainer's config.json beside it (an ae.pt alone may be another tool's state dict)."""
    file = path if path.name == DL_FILE else path / DL_FILE
    return file.exists() and (file.parent / "config.json").exists()


def dl_hook(trainer: dict[str, Any]) -> str:
    """blocks.L.SITE from a trainer's layer and submodule_name (resid_post_layer_3, mlp_out_layer_3, attn_out_..)."""
    layer, name = trainer.get("layer"), str(trainer.get("submodule_name") or "")
    site = next(
        (
            s
            for key, s in (
                ("resid_post", "hook_resid_post"),
                ("resid_pre", "hook_resid_pre"),
                ("mlp", "hook_mlp_out"),
                ("attn", "hook_attn_out"),
            )
            if key in name
        ),
        None,
    )
    return f"blocks.{layer}.{site}" if isinstance(layer, int) and site else ""


def load_dictionary_learning(path: Path, device: str, build: Any) -> Any:
    """A dictionary_learning dictionary (ae.pt + config.json beside it), read with weights_only=True."""
    file = path if path.name == DL_FILE else path / DL_FILE
    config = file.parent / "config.json"
    trainer = read_json(config).get("trainer")
    if not isinstance(trainer, dict) or trainer.get("dict_class") not in DL_CLASSES:
        found = trainer.get("dict_class") if isinstance(trainer, dict) else None
        raise FormatError(
            f"{config}: trainer.dict_class {str(found)[:40]!r} is not one nanosae reads ({', '.join(DL_CLASSES)})"
        )
    arch, names = DL_CLASSES[trainer["dict_class"]]
    try:
        state = torch.load(regular_file(file), map_location="cpu", weights_only=True)
    except FormatError:
        raise
    except Exception as e:  # torch raises many kinds for truncated, corrupt or unsafe files
        raise FormatError(f"{file}: not a readable state dict ({first_line(e)})") from None
    if not isinstance(state, dict) or any(theirs not in state for theirs, _ in names.values()):
        missing = next((t for t, _ in names.values() if not isinstance(state, dict) or t not in state), "?")
        raise FormatError(f"{file}: missing {missing} for a {trainer['dict_class']}")
    t = {
        ours: (state[theirs].T if transpose else state[theirs]).contiguous().float()
        for ours, (theirs, transpose) in names.items()
    }
    if arch == RELU.name:  # from_pretrained's normalize_decoder: unit decoder rows, features scaled to match
        norms = t["W_dec"].norm(dim=1)
        t["W_dec"], t["W_enc"], t["b_enc"] = t["W_dec"] / norms[:, None], t["W_enc"] * norms, t["b_enc"] * norms
    if registry.get(arch).selection == "batch":
        t["threshold"] = t["threshold"].reshape(())
    d_in, d_sae = t["W_enc"].shape
    k = state.get("k")
    groups = (
        [int(g) for g in torch.cumsum(state["group_sizes"], 0)]
        if registry.get(arch).nested and "group_sizes" in state
        else None
    )
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture=arch,
        hook_name=dl_hook(trainer),
        model_name=str(trainer.get("lm_name") or ""),
        apply_b_dec_to_input=arch != JUMPRELU.name,
        k=int(k) if isinstance(k, torch.Tensor) and k.numel() == 1 else trainer.get("k"),
        matryoshka_groups=groups,
    )
    return build_checked(cfg, t, file, device, build)


def is_hub(path: str | Path) -> bool:
    """An `hf:ORG/REPO[/SUBPATH]` id (read from the Hugging Face cache; nothing is ever written beside it)."""
    return str(path).startswith("hf:")


def resolve_hub(spec: str) -> Path:
    """`hf:ORG/REPO[/SUBPATH]` -> the local path of that folder or file, downloaded once into huggingface_hub's
    cache (only SUBPATH's files) and read from the cache after that, offline too (HF_HUB_OFFLINE=1)."""
    parts = spec.removeprefix("hf:").strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise FormatError(f"{spec!r}: a Hub id is hf:ORG/REPO or hf:ORG/REPO/SUBPATH")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import constants, snapshot_download

        # read at call time (huggingface_hub reads them once, when first imported)
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE
        home = os.environ.get("HF_HOME")
        cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else None)
        root = Path(
            snapshot_download(
                repo, allow_patterns=[sub, f"{sub}/*"] if sub else None, cache_dir=cache, local_files_only=offline
            )
        )
    except ImportError:
        raise FormatError(
            f"{spec}: reading from the Hugging Face Hub needs huggingface_hub (pip install 'nanosae[hf]')"
        ) from None
    except Exception as e:  # offline without a cached copy, unknown repository, no network
        raise FormatError(
            f"{spec}: not in the local Hugging Face cache and not downloadable ({first_line(e)})"
        ) from None
    path = root / sub if sub else root
    if not path.exists():
        raise FormatError(f"{spec}: {repo} has no {sub!r}")
    return path


def build_checked(
    cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: Path, device: str, build: Any, assign: bool = False
) -> Any:
    """build(cfg) with tensors (our names) loaded, each checked for shape and finite floats against `where`.
    assign: the SAE takes the tensors themselves (built on the meta device, nothing allocated or copied), so
    tensors mapped from a file stay mapped."""
    if assign:
        with torch.device("meta"):
            sae = build(cfg)
    else:
        sae = build(cfg)
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FormatError(f"{where}: missing tensors {', '.join(missing)} for architecture {cfg.architecture}")
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape:
            # Some writers store a per-latent batchtopk threshold; a single value is what we use.
            if name == "threshold" and ref.dim() == 0 and got.numel() and bool((got == got.flatten()[0]).all()):
                tensors[name] = got.flatten()[0]
                continue
            raise FormatError(
                f"{where}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)} "
                f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}"
            )
        if not got.is_floating_point():
            raise FormatError(
                f"{where}: tensor {name} holds {str(got.dtype).replace('torch.', '')} values, expected floats"
            )
        if not bool(torch.isfinite(got).all()):
            raise FormatError(f"{where}: tensor {name} holds NaN or infinite values")
    sae.load_state_dict({name: tensors[name].to(ref.dtype) for name, ref in expected.items()}, assign=assign)
    return sae.to(device)
