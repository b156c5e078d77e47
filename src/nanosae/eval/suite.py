"""`nanosae eval --suite full`: the core metrics plus absorption, sparse probing and the explanation score, in
eval.json under named sections and as one SAEBench-shaped JSON per evaluation (RUN/saebench/TYPE.json), so the
numbers can be set beside published ones.

What every SAE at a hook is scored on (the word prompts' activations, the probing tasks' activations) is
computed once per hook and shared by all SAEs evaluated together.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanosae.errors import DataError
from nanosae.eval.absorption import LETTERS, AbsorptionConfig, absorption_from_activations, letter_data
from nanosae.eval.probing import ProbingConfig, probe_tasks, probing_data
from nanosae.io import write_json
from nanosae.models import HostModel
from nanosae.sae import SAE

SECTIONS = ("absorption", "sparse_probing", "explanations")
SAEBENCH_TYPES = {
    "core": "core",
    "absorption": "absorption_first_letter",
    "sparse_probing": "sparse_probing",
    "explanations": "autointerp",
}


def run_suite(
    saes: list[SAE],
    model: HostModel,
    hooks: list[str],
    explanations: list[dict[str, Any]],
    status: Callable[[str], None] = lambda _: None,
    absorption_cfg: AbsorptionConfig | None = None,
    probing_cfg: ProbingConfig | None = None,
) -> list[dict[str, Any]]:
    """The sections beyond the core metrics for each SAE (plain SAEs; others get a note)."""
    absorption_cfg, probing_cfg = absorption_cfg or AbsorptionConfig(), probing_cfg or ProbingConfig()
    letters: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    out = []
    for sae, hook, explained in zip(saes, hooks, explanations):
        sections: dict[str, Any] = {}
        if sae.cfg.kind != "sae":
            note = {"note": f"absorption and sparse probing are for SAEs at one hook, not a {sae.cfg.kind}"}
            sections |= {"absorption": note, "sparse_probing": note}
        else:

            def absorbed() -> dict[str, Any]:
                if hook not in letters:
                    status(f"absorption: word prompts at {hook}")
                    letters[hook] = letter_data(model, hook, absorption_cfg)
                status("absorption: probes")
                x, labels = letters[hook]
                return absorption_from_activations(sae, x, labels, list(LETTERS), absorption_cfg)

            def probed() -> dict[str, Any]:
                if hook not in tasks:
                    status(f"sparse probing: task activations at {hook}")
                    tasks[hook] = probing_data(model, hook, probing_cfg)
                status("sparse probing: probes")
                return probe_tasks(sae, tasks[hook], probing_cfg)

            sections["absorption"], sections["sparse_probing"] = _timed(absorbed), _timed(probed)
        sections["explanations"] = explained
        out.append(sections)
    return out


def _timed(evaluation: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """An evaluation's result with its seconds, or a note saying why it could not run on this model and text
    (e.g. a tokenizer without single-token words): one evaluation failing does not lose the others."""
    t = time.perf_counter()
    try:
        return evaluation() | {"seconds": time.perf_counter() - t}
    except DataError as e:
        return {"note": str(e)}


def saebench_records(result: dict[str, Any], sae: SAE) -> dict[str, dict[str, Any]]:
    """One SAEBench-shaped record (eval_type_id, eval_config, eval_result_metrics, eval_result_details, ...) per
    evaluation in an eval.json result."""
    records = {
        "core": _record(
            "core",
            {"tokens": result.get("tokens"), "ablation": result.get("ablation")},
            {
                "model_behavior_preservation": {"kl_div_with_sae": result.get("kl_div")},
                "model_performance_preservation": {
                    "ce_loss_score": result.get("ce_loss_score"),
                    "ce_loss_with_ablation": result.get("ce_loss_with_ablation"),
                    "ce_loss_with_sae": result.get("ce_loss_with_sae"),
                    "ce_loss_without_sae": result.get("ce_loss_clean"),
                },
                "reconstruction_quality": {
                    "explained_variance": result.get("explained_variance"),
                    "mse": result.get("mse"),
                    "cossim": result.get("cosine_similarity"),
                },
                "shrinkage": {"relative_reconstruction_norm": result.get("relative_reconstruction_norm")},
                "sparsity": {"l0": result.get("l0"), "l1": result.get("l1")},
                "misc": {
                    "frac_alive": None if result.get("dead_fraction") is None else 1 - result["dead_fraction"],
                    "freq_over_1_percent": None,
                },
            },
            [],
            sae,
        )
    }
    absorb = result.get("absorption")
    if absorb and "details" in absorb:
        keys = (
            "mean_absorption_fraction_score",
            "mean_full_absorption_score",
            "mean_num_split_features",
            "std_dev_absorption_fraction_score",
            "std_dev_full_absorption_score",
            "std_dev_num_split_features",
        )
        details = [
            {
                k: d[k]
                for k in (
                    "first_letter",
                    "mean_absorption_fraction",
                    "full_absorption_rate",
                    "num_full_absorption",
                    "num_probe_true_positives",
                    "num_split_features",
                )
            }
            for d in absorb["details"]
        ]
        records["absorption"] = _record(
            "absorption_first_letter", absorb["config"], {"mean": {k: absorb[k] for k in keys}}, details, sae
        )
    probing = result.get("sparse_probing")
    if probing and "details" in probing:
        metrics = {side: {k: v for k, v in probing.items() if k.startswith(side + "_")} for side in ("llm", "sae")}
        details = [
            {"dataset_name": task, **{k: v for k, v in d.items() if k.endswith("accuracy")}}
            for task, d in probing["details"].items()
        ]
        records["sparse_probing"] = _record("sparse_probing", probing["config"], metrics, details, sae)
    expl = result.get("explanations")
    if expl and expl.get("latents_scored"):
        records["explanations"] = _record(
            "autointerp",
            {"scoring": "detection, balanced accuracy"},
            {
                "autointerp": {
                    "autointerp_score": expl["explanation_score"],
                    "autointerp_std_dev": expl["explanation_score_std"],
                    "latents_scored": expl["latents_scored"],
                }
            },
            [],
            sae,
        )
    return records


def _record(eval_type: str, config: dict, metrics: dict, details: list, sae: SAE) -> dict[str, Any]:
    return {
        "eval_type_id": eval_type,
        "eval_config": config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"nanosae {_version()}",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": _cfg_dict(sae),
        "eval_result_unstructured": None,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanosae")
    except PackageNotFoundError:
        return "unknown"


def _cfg_dict(sae: SAE) -> dict[str, Any]:
    import dataclasses

    return {
        k: v for k, v in dataclasses.asdict(sae.cfg).items() if isinstance(v, (str, int, float, bool, list, type(None)))
    }


def write_saebench(folder: Path, result: dict[str, Any], sae: SAE) -> list[Path]:
    """RUN/saebench/<eval_type_id>.json, one per evaluation in the result."""
    paths = []
    for record in saebench_records(result, sae).values():
        paths.append(write_json(folder / f"{record['eval_type_id']}.json", record))
    return paths
