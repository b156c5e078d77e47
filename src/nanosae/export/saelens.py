"""A plain SAELens directory: what SAELens loads and runs as is (activation scaling folded into the weights,
BatchTopK/Matryoshka as JumpReLU with their threshold), with sparsity.safetensors from features.db."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nanosae.config import SAEConfig
from nanosae.errors import ConfigError
from nanosae.interp.featuredb import FeatureDB, db_path
from nanosae.outputs import replacing_dir, resolved
from nanosae.rundir import home, is_hub, locate
from nanosae.sae import SAE
from nanosae.sae.formats import save_sae


@torch.no_grad()
def saelens_sae(sae: SAE) -> SAE:
    """The SAE as SAELens runs it at inference: the activation scaling folded into the weights (SAELens's
    fold_activation_norm_scaling_factor), and a BatchTopK (or Matryoshka) SAE as a JumpReLU with its global
    threshold. Pre-activations are unchanged, so thresholds carry over as they are."""
    if sae.cfg.kind == "crosscoder":
        raise ConfigError("SAELens has no crosscoder type; share crosscoders in nanosae's own format (the run's sae/ dir)")
    if sae.cfg.kind == "transcoder" and sae.cfg.architecture == "topk":
        raise ConfigError("SAELens has no TopK transcoder type (it has relu, skip and jumprelu transcoders)")
    return fold_scales(sae, "jumprelu" if sae.cfg.architecture in ("batchtopk", "matryoshka") else sae.cfg.architecture)


@torch.no_grad()
def fold_scales(sae: SAE, arch: str) -> SAE:
    """The same SAE with its activation scaling folded into the weights (input and output scale 1), as `arch`
    (a BatchTopK/Matryoshka SAE as `jumprelu` keeps its global threshold per latent)."""
    cfg = SAEConfig(**{**sae.cfg.to_dict(), "architecture": arch, "activation_scale": 1.0, "output_scale": None,
                       **({"k": None, "matryoshka_groups": None} if arch != sae.cfg.architecture else {})})
    out = SAE(cfg)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    if arch != sae.cfg.architecture:
        state["threshold"] = sae.threshold.detach().expand(sae.cfg.d_sae).clone()
    s_in, s_out = sae.input_factor(), sae.output_factor()
    s_in_col = s_in[:, None] if isinstance(s_in, torch.Tensor) else s_in
    s_out_col = s_out[:, None] if isinstance(s_out, torch.Tensor) else s_out
    state["W_enc"] = state["W_enc"] * s_in_col  # (x·s − b)W = (x − b/s)(sW)
    state["W_dec"] = state["W_dec"] / s_out
    state["b_dec"] = state["b_dec"] / s_out
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"] * s_in / s_out_col
    out.load_state_dict(state)
    return out


def export_saelens(run: str | Path, out: str | Path) -> Path:
    """Write a plain SAELens-loadable directory (cfg.json, sae_weights.safetensors, sparsity.safetensors): a new
    or empty one, or an earlier SAELens export (outputs.check_dir), swapped in whole."""
    with replacing_dir(out, "SAELens export", home=None if is_hub(run) else home(run).resolve()) as tmp:
        write_saelens(run, tmp)
    return resolved(out)


def write_saelens(run: str | Path, out: Path) -> Path:
    """The SAELens files of a run's SAE written into `out` (a directory the caller has claimed)."""
    _, sae_path = locate(run)
    sae = saelens_sae(SAE.load(sae_path))
    sparsity = None
    db = None if is_hub(run) else db_path(home(run))
    if db is not None and db.exists():
        dens = FeatureDB(db).densities()
        sparsity = torch.tensor([math.log10(d) if d > 0 else -10.0 for d in dens])  # SAELens stores log10 density
    return save_sae(sae, Path(out), sparsity=sparsity)
