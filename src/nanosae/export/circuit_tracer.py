"""A transcoder set in circuit-tracer's layout (interp/circuit_tracer.py describes it), so circuit-tracer loads it
unchanged: put the directory in its cache (CIRCUIT_TRACER_CACHE_DIR/NAME, then `load_transcoders_from_cache`),
push it to the Hub and name it in `ReplacementModel.from_pretrained`, or hand its files to `load_transcoder_set` /
`load_clt`. nanosae reads the same directory back (`trace --transcoders DIR`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanosae.errors import ConfigError
from nanosae.export.saelens import fold_scales
from nanosae.interp.circuit_tracer import CONFIG, scan_name
from nanosae.interp.circuits import TranscoderSet, load_transcoders
from nanosae.outputs import replacing_dir, resolved
from nanosae.sae import SAE
from nanosae.sae.architectures import BATCHTOPK, JUMPRELU, MATRYOSHKA, RELU


def folded(tc: SAE) -> SAE:
    """A transcoder in circuit-tracer's form (no input scaling, b_dec not subtracted): ReLU stays ReLU; JumpReLU,
    and BatchTopK or Matryoshka on their inference threshold, become JumpReLU. TopK has no exact form there."""
    arch = tc.cfg.architecture
    if arch not in (RELU.name, JUMPRELU.name, BATCHTOPK.name, MATRYOSHKA.name):
        raise ConfigError(
            f"{tc.cfg.hook_name}: circuit-tracer's transcoders are ReLU or JumpReLU and a {arch} transcoder has no "
            "exact form there (train the set with --architecture batchtopk, jumprelu or relu)"
        )
    if tc.cfg.normalize_activations != "none":
        raise ConfigError(f"{tc.cfg.hook_name}: circuit-tracer's transcoders have no layer-normed inputs")
    return fold_scales(tc, RELU.name if arch == RELU.name else JUMPRELU.name, subtract_b_dec=False)


def files(tset: TranscoderSet) -> dict[str, dict[str, torch.Tensor]]:
    """{file name: tensors} of a set in circuit-tracer's layout (layers must run from 0 without gaps)."""
    if tset.layers != list(range(len(tset))):
        raise ConfigError(f"circuit-tracer needs a transcoder for every layer from 0; this set has {tset.layers}")
    reads = {tc.cfg.hook_name.split(".", 2)[-1] for tc in tset.by_layer.values()}
    if reads != {"ln2.hook_normalized"}:
        raise ConfigError(f"circuit-tracer exports need transcoders reading the MLP's input; these read {reads}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for L, tc in tset.items():
        tc = folded(tc)
        enc = {"W_enc": tc.W_enc.T, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if tc.cfg.architecture == JUMPRELU.name:
            enc["threshold"] = tc.threshold
        if not tset.cross_layer:
            single = {("activation_function.threshold" if k == "threshold" else k): v for k, v in enc.items()}
            out[f"layer_{L}.safetensors"] = (
                single | {"W_dec": tc.W_dec} | ({"W_skip": tc.W_skip} if tc.cfg.skip_connection else {})
            )
            continue
        if tc.cfg.skip_connection:
            raise ConfigError("circuit-tracer's cross-layer files hold no skip connection; this set has one")
        out[f"W_enc_{L}.safetensors"] = {f"{k}_{L}": v for k, v in enc.items()}
        # layer L's decoders into L, L+1, ... in the model's units (which the folded form is in)
        out[f"W_dec_{L}.safetensors"] = {f"W_dec_{L}": torch.stack([tset.rows(L, j) for j in tset.targets(L)], 1)}
    return {name: {k: v.detach().float().contiguous().cpu() for k, v in t.items()} for name, t in out.items()}


def config(tset: TranscoderSet, model: str, scan: str) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_kind": "cross_layer_transcoder" if tset.cross_layer else "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": scan,
    }


def export_circuit_tracer(run: str | Path, out: str | Path, scan: str | None = None) -> Path:
    """OUT/config.yaml and the set's safetensors files: a new or empty directory, or an earlier export of this kind
    (outputs.check_dir), swapped in whole. scan: the set's name in circuit-tracer and Neuronpedia (default: the
    directory's name)."""
    import yaml

    model, tset = load_transcoders(run)
    scan = scan_name(scan or Path(run).resolve().name)
    written = files(tset)
    with replacing_dir(out, "circuit-tracer export", home=Path(run).resolve()) as tmp:
        for name, tensors in written.items():
            save_file(tensors, str(tmp / name))
        (tmp / CONFIG).write_text(yaml.safe_dump(config(tset, model, scan), sort_keys=False))
    return resolved(out)
