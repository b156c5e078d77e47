"""Checkpoints and job identity: where a run's state is saved and found again, and what makes a run directory
the same job as the command continuing it (so a resumed run never mixes two jobs)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nanosae.config import TrainConfig, flat_settings
from nanosae.data import ActivationStore
from nanosae.errors import ConfigError, FormatError, first_line
from nanosae.io import is_number, public_mode, regular_file
from nanosae.rundir import RunDir
from nanosae.sae import SAE
from nanosae.sae.formats import save_sae
from nanosae.train.sharded import shard_names

log = logging.getLogger(__name__)


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint, oldest first."""
    found = []
    for p in RunDir(run_dir).checkpoints.glob("step_*"):
        suffix = p.name.removeprefix("step_")
        if is_number(suffix) and (p / "state.pt").exists():
            found.append((int(suffix), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    sae: SAE | None,
    state: dict[str, Any],
    moved: dict[str, Path] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step_N/ via a temp directory renamed into place; keep the newest `keep` up to N (a
    newer one can only be this run's own, unreadable one it fell back from; it is replaced when reached).
    moved: files (written by other processes) moved in under the given names; sae None: no whole SAE."""
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step}."))
    try:
        public_mode(tmp, directory=True)
        if sae is not None:
            save_sae(sae, tmp / "sae")
        for name, path in (moved or {}).items():
            os.replace(path, tmp / name)
        torch.save(state, tmp / "state.pt")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in [c for c in _checkpoints(run_dir) if c[0] <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def common_steps(run_dirs: list[Path]) -> set[int]:
    """The checkpoint steps every one of these runs has on disk: runs that share a stream (a transcoder set)
    resume together from the newest of them, even when a kill fell between two runs' checkpoints."""
    steps = [{step for step, _ in _checkpoints(d)} for d in run_dirs]
    return set.intersection(*steps) if steps else set()


def load_checkpoint(run_dir: Path, steps: set[int] | None = None) -> tuple[Path, dict[str, Any], SAE | None] | None:
    """The newest readable checkpoint (directory, state, SAE), among `steps` when given; an unreadable newer one
    is skipped with a warning (e.g. truncated by a full disk). None when there is none; an error when none can
    be read."""
    found = [c for c in _checkpoints(run_dir) if steps is None or c[0] in steps]
    for step, ckpt in reversed(found):
        try:
            state = torch.load(regular_file(ckpt / "state.pt"), map_location="cpu", weights_only=True)
            if (
                not isinstance(state, dict)
                or not {"step", "batches"} <= set(state)
                or not {"optimizer", "shards"} & set(state)
            ):
                raise FormatError("not a nanosae checkpoint state")
            if state["step"] != step or not isinstance(state["batches"], int) or state["batches"] < step:
                raise FormatError(f"its state says step {str(state['step'])[:20]}, batch {str(state['batches'])[:20]}")
            if "decoders" in state:  # a cross-layer transcoder's later-layer decoders: no SAE
                return ckpt, state, None
            if "shards" in state:  # sharded latents: one file per slice, no whole SAE
                for name in shard_names(state["shards"]):  # each opened (its index read), so a truncated one falls back
                    torch.load(ckpt / name, map_location="cpu", weights_only=True, mmap=True)
                return ckpt, state, None
            return ckpt, state, SAE.load(ckpt / "sae")
        except Exception as e:  # torch.load raises many kinds for truncated or corrupt files
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt, first_line(e))
    if found:
        raise FormatError(
            f"{RunDir(run_dir).checkpoints}: no checkpoint can be read; move it away to start the run over"
        )
    return None


# ---- the run directory: one job per directory -----------------------------------------------------------
# Settings that may change when a run continues: they do not change what is trained.
RUNTIME_FIELDS = ("out", "resume", "log_every", "checkpoint_every", "tensorboard", "wandb", "device", "distribute_saes")


def job_identity(cfg: TrainConfig, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What makes two runs the same job: every setting but the runtime ones, store paths resolved (so `acts`
    and `./acts` are one store), plus the fingerprints of the stores read (when known)."""
    job = {k: v for k, v in flat_settings(cfg).items() if k not in RUNTIME_FIELDS}
    for key in ("acts", "acts_out"):
        if job.get(key):
            job[key] = str(Path(job[key]).resolve())
    if job.get("crosscoder_acts"):
        job["crosscoder_acts"] = [str(Path(p).resolve()) for p in job["crosscoder_acts"]]
    if sources is not None:
        job["sources"] = sources
    return json.loads(json.dumps(job))  # tuples -> lists, as read back from JSON


def saved_job(saved: dict[str, Any], where: Path) -> dict[str, Any]:
    """The job a config.json (or a checkpoint's config) records, in job_identity's form."""
    try:
        return job_identity(TrainConfig.from_dict(saved), saved.get("sources"))
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from None


def store_fingerprint(store: ActivationStore) -> dict[str, Any]:
    """Which activations a store holds: another collection at the same path is another job."""
    m = store.manifest
    first = m["shards"][0]["sha256"] if m["shards"] else None
    return {
        "hook": m.get("hook"),
        "model": m.get("model"),
        "d_in": store.d_in,
        "tokens": len(store),
        "first_shard": first,
    }


def compare_jobs(saved: dict[str, Any], job: dict[str, Any], where: Path | str) -> None:
    """Refuse, naming the first setting that differs, when `where` records another job than this one."""
    for key in sorted(set(saved) | set(job)):
        if key == "sources" and key not in saved:  # runs from before fingerprints were recorded
            continue
        if saved.get(key) != job.get(key):
            raise ConfigError(
                f"{where} records another run ({key}={_short(saved.get(key))}, this run asks for "
                f"{_short(job.get(key))}); use another --out, nothing was changed"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
