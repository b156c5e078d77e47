"""An SAE in EleutherAI sparsify's layout, so `SparseCoder.load_from_disk` / `load_many` read it unchanged:
OUT/HOOKPOINT/cfg.json + sae.safetensors (see sae/foreign.py for the format and its equations).

sparsify has no input scaling and subtracts b_dec only for SAEs (not transcoders): export.saelens.fold_scales folds
the activation scale into the weights and moves b_dec's place in the encoder into b_enc where the conventions
differ. Only TopK dictionaries have a sparsify form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanosae.errors import ConfigError
from nanosae.export.saelens import fold_scales
from nanosae.outputs import replacing_dir, resolved
from nanosae.rundir import locate, own_home
from nanosae.sae import SAE
from nanosae.sae.architectures import TOPK


def hookpoint(hook: str, transcoder: bool) -> str:
    """sparsify's module path for a nanosae hook (the inverse of foreign.hook_names)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|ln2\.hook_normalized|hook_attn_out)", hook)
    if not m:
        raise ConfigError(f"hook {hook!r} has no sparsify hookpoint (resid_post, mlp_out or attn_out of a block)")
    layer, site = m.groups()
    return (
        f"layers.{layer}"
        if site == "hook_resid_post"
        else f"layers.{layer}.self_attn"
        if site == "hook_attn_out"
        else f"layers.{layer}.mlp"
    )


@torch.no_grad()
def sparsify_files(sae: SAE) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(hookpoint folder, cfg.json, tensors) of a TopK SAE or transcoder."""
    if sae.arch is not TOPK or sae.cfg.normalize_activations != "none" or sae.cfg.kind == "crosscoder":
        raise ConfigError(
            f"sparsify has TopK sparse coders only; this is a {sae.cfg.architecture} {sae.cfg.kind}"
            + (" with layer-norm inputs" if sae.cfg.normalize_activations != "none" else "")
        )
    transcoder = sae.cfg.kind == "transcoder"
    if transcoder and sae.cfg.d_out != sae.cfg.d_in:
        raise ConfigError(
            f"sparsify's transcoders map a width to itself; this one maps {sae.cfg.d_in} to {sae.cfg.d_out}"
        )
    folded = fold_scales(sae, TOPK.name, subtract_b_dec=not transcoder)  # sparsify subtracts b_dec for SAEs only
    W_enc, b_enc, W_dec, b_dec = (
        folded.W_enc.float(),
        folded.b_enc.float(),
        folded.W_dec.float(),
        folded.b_dec.float(),
    )
    tensors = {
        "encoder.weight": W_enc.T.contiguous(),
        "encoder.bias": b_enc.contiguous(),
        "W_dec": W_dec.contiguous(),
        "b_dec": b_dec.contiguous(),
    }
    if sae.cfg.skip_connection:
        tensors["W_skip"] = folded.W_skip.float().contiguous()
    cfg = {
        "activation": TOPK.name,
        "expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in),
        "normalize_decoder": True,
        "num_latents": sae.cfg.d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": sae.cfg.skip_connection,
        "transcode": transcoder,
        "d_in": sae.cfg.d_in,
    }
    return hookpoint(sae.cfg.hook_name, transcoder), cfg, tensors


def export_sparsify(run: str | Path, out: str | Path) -> Path:
    """OUT/HOOKPOINT/{cfg.json, sae.safetensors}: new, empty, or an earlier sparsify export (outputs.check_dir)."""
    _, sae_path = locate(run)
    name, cfg, tensors = sparsify_files(SAE.load(sae_path))
    with replacing_dir(out, "sparsify export", home=own_home(run)) as tmp:
        (tmp / name).mkdir()
        save_file(tensors, str(tmp / name / "sae.safetensors"))
        (tmp / name / "cfg.json").write_text(json.dumps(cfg))
    return resolved(out) / name
