"""`nanosae eval` as one library call: load the SAEs and their model, evaluate them on the same tokens, run the
full suite when asked, and write each SAE's eval.json (and SAEBench records) where it belongs and one report."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from nanosae.config import EvalConfig
from nanosae.eval.metrics import evaluate
from nanosae.eval.probing import ProbingConfig, read_user_task
from nanosae.eval.report import is_report, write_report
from nanosae.eval.suite import run_suite, write_saebench
from nanosae.io import write_json, write_lock
from nanosae.models import load_model
from nanosae.outputs import check_file, resolved
from nanosae.rundir import RunDir, eval_path, is_hub, locate, model_spec, own_home, report_dir
from nanosae.sae import SAE


class EvalRun(NamedTuple):
    results: list[dict[str, Any]]
    names: list[str]  # one column name per SAE
    report: Path
    model: str


def evaluate_paths(
    paths: list[Path],
    cfg: EvalConfig,
    model: str | None = None,
    hook: str | None = None,
    out: Path | None = None,
    device: str = "cpu",
    tokenizer: Path | None = None,
    explanations: Callable[[list[RunDir | None]], list[dict[str, Any]]] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    status: Callable[[str], None] = lambda _: None,
) -> EvalRun:
    """Evaluate the SAEs at paths (run directories or SAE files) on cfg's tokens. Everything that could refuse
    (probing tasks, where the report goes) is checked before the work. explanations(runs): the suite's
    "explanations" section per SAE, read from each run's features.db by the caller (interp sits above eval)."""
    for task in cfg.probing_task:
        read_user_task(task)
    located = [locate(p) for p in paths]
    where = resolved(out) if out else report_dir(located)
    own = out is None or where in {own_home(p) for p in paths}
    report_path = check_file(where / "report.html", "evaluation report", is_report, home=where if own else None)
    saes = [SAE.load(sae_path, device=device) for _, sae_path in located]
    spec = model_spec(saes[0], model, paths[0])
    host = load_model(spec, device=device, tokenizer=tokenizer)
    results = evaluate(
        saes,
        host,
        cfg.data,
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        ablation=cfg.ablation,
        hooks=[hook] * len(saes) if hook else None,
        progress=progress,
    )
    if cfg.suite == "full":
        explained = explanations([run for run, _ in located]) if explanations else [{} for _ in located]
        extra = run_suite(
            saes,
            host,
            [hook or r["hook"] for r in results],
            explained,
            status=status,
            probing_cfg=ProbingConfig(user_tasks=[str(t) for t in cfg.probing_task]),
        )
        results = [r | sections for r, sections in zip(results, extra)]
    for (run, sae_path), result, sae in zip(located, results, saes):
        with write_lock(run.path) if run else contextlib.nullcontext():  # not while a training run writes it
            hub_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(sae_path).removeprefix("hf:"))
            path = write_json(where / f"{hub_name}.eval.json" if is_hub(sae_path) else eval_path(run, sae_path), result)
            if cfg.suite == "full":
                write_saebench(
                    path.parent
                    / (
                        f"{path.name.removesuffix('.eval.json')}.saebench"
                        if path.name.endswith(".eval.json")
                        else "saebench"
                    ),
                    result,
                    sae,
                )
    names = [(run.path if run else sae_path).name for run, sae_path in located]
    return EvalRun(results, names, write_report(results, names, report_path), spec)
