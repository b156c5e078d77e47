"""A plain SAELens directory: what SAELens loads and runs as is (activation scaling folded into the weights,
BatchTopK/Matryoshka as JumpReLU with their threshold), with sparsity.safetensors from features.db."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nanosae import registry
from nanosae.config import SAEConfig
from nanosae.errors import ConfigError
from nanosae.interp.featuredb import FeatureDB, db_path
from nanosae.outputs import replacing_dir, resolved
from nanosae.rundir import locate, own_home
from nanosae.sae import SAE
from nanosae.sae.formats import save_sae


@torch.no_grad()
def saelens_sae(sae: SAE) -> SAE:
    """The SAE as SAELens runs it at inference: the activation scaling folded into the weights (SAELens's
    fold_activation_norm_scaling_factor), and a BatchTopK (or Matryoshka) SAE as a JumpReLU with its global
    threshold. Pre-activations are unchanged, so thresholds carry over as they are."""
    if sae.cfg.kind == "crosscoder":
        raise ConfigError(
            "SAELens has no crosscoder type; share crosscoders in nanosae's own format (the run's sae/ dir)"
        )
    if sae.cfg.kind == "transcoder" and not sae.arch.saelens_transcoder:
        raise ConfigError(
            f"SAELens has no {sae.cfg.architecture} transcoder type (it has relu, skip and jumprelu transcoders)"
        )
    arch = sae.arch.saelens_name
    # SAELens's transcoders never subtract b_dec from their input (its reader, and ours, say so)
    return fold_scales(sae, arch, subtract_b_dec=bool(sae.cfg.apply_b_dec_to_input) and sae.cfg.kind != "transcoder")


@torch.no_grad()
def fold_scales(sae: SAE, arch: str, subtract_b_dec: bool) -> SAE:
    """The same SAE with its activation scaling folded into the weights (input and output scale 1), as `arch`
    (a BatchTopK/Matryoshka SAE as `jumprelu` keeps its global threshold per latent), subtracting b_dec from its
    input or not as asked. Ours computes pre = (s_in·x − a·b_dec) W_enc + b_enc; the folded one
    (x − t·b_dec') W_enc' + b_enc' with W_enc' = s_in·W_enc, b_dec' = b_dec / s_out: equal when
    b_enc' = b_enc − a·b_dec W_enc + t·b_dec' W_enc' (a transcoder's two scales differ, so b_dec moves)."""
    target = registry.get(arch)
    cfg = SAEConfig(
        **{
            **sae.cfg.to_dict(),
            "architecture": arch,
            "activation_scale": 1.0,
            "output_scale": None,
            "apply_b_dec_to_input": subtract_b_dec,
            **({} if target.uses_k else {"k": None}),
            **({} if target.nested else {"matryoshka_groups": None}),
        }
    )
    out = SAE(cfg)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    wanted = out.state_dict()
    if "threshold" in state and wanted["threshold"].shape != state["threshold"].shape:  # one global -> per latent
        state["threshold"] = state["threshold"].expand(wanted["threshold"].shape).clone()
    s_in, s_out = sae.input_factor(), sae.output_factor()
    s_in_col = s_in[:, None] if isinstance(s_in, torch.Tensor) else s_in
    s_out_col = s_out[:, None] if isinstance(s_out, torch.Tensor) else s_out
    state["W_enc"] = state["W_enc"] * s_in_col  # (x·s − b)W = (x − b/s)(sW)
    state["W_dec"] = state["W_dec"] / s_out
    state["b_dec"] = state["b_dec"] / s_out
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"] * s_in / s_out_col
    # an SAE keeping its convention needs nothing (one scale: b_dec/s · s·W_enc = b_dec W_enc); b_dec lives in the
    # input's space only when it is subtracted from it
    if sae.cfg.kind == "transcoder" or bool(sae.cfg.apply_b_dec_to_input) != subtract_b_dec:
        if sae.cfg.apply_b_dec_to_input:
            state["b_enc"] = state["b_enc"] - sae.b_dec @ sae.W_enc
        if subtract_b_dec:
            state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    out.load_state_dict(state)
    return out


def export_saelens(run: str | Path, out: str | Path) -> Path:
    """Write a plain SAELens-loadable directory (cfg.json, sae_weights.safetensors, sparsity.safetensors): a new
    or empty one, or an earlier SAELens export (outputs.check_dir), swapped in whole."""
    with replacing_dir(out, "SAELens export", home=own_home(run)) as tmp:
        write_saelens(run, tmp)
    return resolved(out)


def write_saelens(run: str | Path, out: Path) -> Path:
    """The SAELens files of a run's SAE written into `out` (a directory the caller has claimed)."""
    _, sae_path = locate(run)
    sae = saelens_sae(SAE.load(sae_path))
    sparsity = None
    folder = own_home(run)  # a Hub SAE has no features.db beside it
    db = db_path(folder) if folder is not None else None
    if db is not None and db.exists():
        dens = FeatureDB(db).densities()
        sparsity = torch.tensor([math.log10(d) if d > 0 else -10.0 for d in dens])  # SAELens stores log10 density
    return save_sae(sae, Path(out), sparsity=sparsity)
