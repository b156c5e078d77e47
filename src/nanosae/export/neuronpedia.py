"""Neuronpedia's upload files for a run: the SAE in SAELens format plus feature dashboards and explanations.

Neuronpedia layout (as SAEDashboard's NeuronpediaRunner writes it): batch-N.json files, each
{"model_id", "layer", "sae_set", "features": [...]} with per feature its index, pos_str/pos_values and
neg_str/neg_values (logit effects), frac_nonzero, the activation histogram (freq_hist_data_bar_values /
_heights), correlated feature indices, and "activations": token windows with values, the top group marked
bin_min = -1, bin_contains = -1, quantile samples as their own small bins; plus run_settings.json,
explanations.json and the SAE itself in SAELens format under sae/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanosae.export.saelens import write_saelens
from nanosae.interp.featuredb import FeatureDB
from nanosae.io import atomic_write, write_json
from nanosae.outputs import replacing_dir, resolved
from nanosae.rundir import locate, own_home
from nanosae.sae import SAE
from nanosae.sae.formats import hook_layer

BATCH_SIZE = 128


def feature_json(
    row: Any,
    examples: list[Any],
    edges: list[float],
    n_tokens: int,
    context: int,
    dataset: str,
    cell: Callable[[Any, str], Any],
) -> dict:
    """One feature in Neuronpedia's batch layout; cell parses a JSON column (FeatureDB.cell: a damaged one is a
    one-line error naming the database)."""
    hist = cell(row["histogram"], "histogram")
    centres = [edges[0] / 2] + [(edges[i - 1] + edges[i]) / 2 for i in range(1, len(edges))] + [edges[-1]]
    pos, neg = cell(row["top_logits"], "top_logits"), cell(row["bottom_logits"], "bottom_logits")
    quantiles = [e for e in examples if e["kind"] == "quantile"]
    activations = []
    bin_min: float
    bin_max: float
    contains: float
    for e in examples:
        if e["kind"] == "top":
            bin_min, bin_max, contains = -1, row["max_act"], -1
        else:
            bin_min = bin_max = e["activation"]
            contains = 1 / max(1, len(quantiles))
        activations.append(
            {
                "bin_min": bin_min,
                "bin_max": bin_max,
                "bin_contains": contains,
                "tokens": cell(e["tokens"], "example tokens"),
                "values": cell(e["acts"], "example acts"),
                "qualifying_token_index": e["focus"],
            }
        )
    return {
        "feature_index": row["id"],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [j for j, _ in cell(row["cofiring"], "cofiring")],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [t for t, _ in neg],
        "neg_values": [v for _, v in neg],
        "pos_str": [t for t, _ in pos],
        "pos_values": [v for _, v in pos],
        "frac_nonzero": row["density"],
        "freq_hist_data_bar_values": [round(c, 5) for c, h in zip(centres, hist) if h],
        "freq_hist_data_bar_heights": [h for h in hist if h],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": max(1, n_tokens // max(1, context)),
        "n_tokens_in_prompt": context,
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


README = """# Neuronpedia upload: {name}

Made by `nanosae export neuronpedia`. Contents:

- `sae/` — the SAE in SAELens format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`).
- `batch-N.json` — feature dashboards in the layout SAEDashboard's NeuronpediaRunner writes
  ({n_features} features, {batch} per file).
- `explanations.json` — one explanation per feature that has one (method and score included).
- `run_settings.json` — how the dashboards were made.

Upload steps:
1. Put the SAE weights somewhere public (e.g. a Hugging Face repo) — Neuronpedia links to them.
2. Request a new source at https://www.neuronpedia.org (the "Upload SAEs" form) naming the model
   (`{model}`), the hook (`{hook}`, layer {layer}) and the weights location.
3. Send the `batch-*.json` files (and `explanations.json`) as that form asks, or convert them with
   SAEDashboard's `neuronpedia_export` to the bulk-import layout for Neuronpedia's maintainers.
"""


def export_neuronpedia(
    run: str | Path, out: str | Path, model_id: str | None = None, sae_set: str | None = None, batch: int = BATCH_SIZE
) -> Path:
    run = Path(run)
    _, sae_path = locate(run)
    db = FeatureDB(run)
    meta = db.meta()
    with replacing_dir(out, "Neuronpedia export", home=own_home(run)) as tmp:
        _write_neuronpedia(run, tmp, db, meta, sae_path, model_id, sae_set, batch)
    return resolved(out)


def _write_neuronpedia(
    run: Path,
    out: Path,
    db: FeatureDB,
    meta: dict,
    sae_path: Path,
    model_id: str | None,
    sae_set: str | None,
    batch: int,
) -> None:
    write_saelens(run, out / "sae")
    model_id = model_id or str(meta["model"]).replace("/", "_")
    sae_set = sae_set or f"nanosae-{meta['architecture']}-{meta['d_sae']}"
    context = int(SAE.load(sae_path).cfg.context_size or 128)
    rows = db.latents()
    dataset = ",".join(meta.get("data") or [])
    for n, start in enumerate(range(0, len(rows), batch)):
        feats = [
            feature_json(row, db.examples(row["id"]), meta["hist_edges"], meta["tokens"], context, dataset, db.cell)
            for row in rows[start : start + batch]
        ]
        write_json(
            out / f"batch-{n}.json",
            {"model_id": model_id, "layer": hook_layer(meta["hook"]), "sae_set": sae_set, "features": feats},
        )
    explanations = [
        {
            "index": r["id"],
            "description": r["explanation"],
            "explanationModelName": r["method"] or "unknown",
            "score": r["score"],
        }
        for r in rows
        if r["explanation"]
    ]
    write_json(out / "explanations.json", explanations)
    write_json(
        out / "run_settings.json",
        {
            "model_id": model_id,
            "sae_set": sae_set,
            "hook": meta["hook"],
            "layer": hook_layer(meta["hook"]),
            "n_features": len(rows),
            "tokens": meta["tokens"],
            "data": meta.get("data"),
            "made_by": "nanosae export neuronpedia",
        },
    )
    text = README.format(
        name=sae_set,
        n_features=len(rows),
        batch=batch,
        model=model_id,
        hook=meta["hook"],
        layer=hook_layer(meta["hook"]),
    )
    atomic_write(out / "README.md", lambda p: p.write_text(text))
