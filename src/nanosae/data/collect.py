"""Collect activations: text -> token windows (background thread) -> truncated forward -> shards (background thread).

Resumable: the manifest of each hook lists its complete shards. A re-run of the same command replays
the deterministic token stream, skips the windows already collected without running the model (the
kept positions depend only on the tokens), recomputes the one batch that straddles the boundary with
the same batch composition, and continues. The final store holds exactly `tokens` activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from nanosae.config import CollectConfig, DataConfig, model_dtype
from nanosae.data.corpus import iter_documents
from nanosae.data.store import FORMAT, MANIFEST, ActivationStore, ShardWriter, read_manifest, shard_problem
from nanosae.data.tokens import in_background, token_batches
from nanosae.errors import ConfigError, DataError
from nanosae.io import write_json, write_lock
from nanosae.models import HostModel, load_model
from nanosae.outputs import check_job_dir

log = logging.getLogger(__name__)


class CollectProgress(NamedTuple):
    tokens: int
    total: int
    bytes_written: int
    seconds: float


# Settings that must not change between a run and its resume (they change which activations land where).
_IDENTITY_KEYS = (
    "model",
    "hook",
    "d_in",
    "dtype",
    "context_size",
    "tokens_per_shard",
    "batch_size",
    "data",
    "model_dtype",
)


def _manifest_for(cfg: CollectConfig, model: HostModel, hook: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model.name,
        "hook": hook,
        "d_in": model.hook_dim(hook),
        "dtype": cfg.dtype,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "context_size": cfg.data.context_size,
        "tokens_per_shard": cfg.tokens_per_shard,
        "batch_size": cfg.batch_size,
        "data": dataclasses.asdict(cfg.data),
        "bos_id": model.tokenizer.bos_id,
        "target_tokens": cfg.tokens,
        "tokens": 0,
        "bytes": 0,
        "complete": False,
        "shards": [],
        "norm_scale": None,
    }


def _resume_manifest(directory: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    if not (directory / MANIFEST).exists():
        return fresh
    old = read_manifest(directory)
    if not old["shards"]:  # nothing was collected (the run failed at once): nothing to continue or protect
        return fresh
    if isinstance(old.get("data"), dict):  # written by an older nanosae: its key names, today's
        old["data"] = dataclasses.asdict(DataConfig.from_dict(old["data"]))
    for key in _IDENTITY_KEYS:
        if (
            old.get(key, fresh[key] if key == "model_dtype" else None) != fresh[key]
        ):  # stores from before it was recorded
            raise DataError(
                f"{directory}: the store was collected with {key}={old.get(key)!r}, this run asks for "
                f"{fresh[key]!r}; use another --out or the same settings"
            )
    # only full, intact shards are kept: a short last shard is recollected so shard i always holds tokens
    # [i*S, (i+1)*S), and a missing or corrupted shard is recollected with every shard after it
    size: int = old["tokens_per_shard"]
    kept: list[dict[str, Any]] = []
    for entry in old["shards"][: fresh["target_tokens"] // size]:
        problem = None if entry["tokens"] == size else "short"
        problem = problem or shard_problem(directory, entry)
        if problem:
            if problem != "short":
                log.warning("%s; collecting again from token %d", problem, len(kept) * size)
            break
        kept.append(entry)
    old["shards"] = kept
    old["tokens"] = sum(s["tokens"] for s in old["shards"])
    old["bytes"] = sum(
        (directory / s["file"]).stat().st_size for s in old["shards"] if (directory / s["file"]).exists()
    )
    old.update(target_tokens=fresh["target_tokens"], complete=False, norm_scale=None)
    return old


def collect(
    cfg: CollectConfig, model: HostModel | None = None, progress: Callable[[CollectProgress], None] | None = None
) -> dict[str, ActivationStore]:
    """Collect cfg.tokens activations per hook into cfg.out/<hook>/; returns the opened stores."""
    if cfg.tokens <= 0 or cfg.tokens_per_shard <= 0 or cfg.batch_size <= 0:
        raise ConfigError("tokens, tokens_per_shard and batch_size must be positive")
    if not cfg.hooks:
        raise ConfigError("no hook given (expected at least one --hook)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a directory for the stores")
    model = model or load_model(
        cfg.model, device=cfg.device, dtype=model_dtype(cfg.model_dtype, cfg.device), tokenizer=cfg.tokenizer
    )
    for hook in cfg.hooks:
        model.parse_hook(hook)
        check_job_dir(out / hook, "activation store", allow=("training run", "transcoder set"))
        if (out / hook).is_dir() and any((out / hook).iterdir()) and not (out / hook / MANIFEST).exists():
            raise ConfigError(
                f"--out {out / hook} holds files but no {MANIFEST}: not a store; use another --out, nothing was changed"
            )
    with contextlib.ExitStack() as locks:  # one writer per store: a second collect into it is refused
        for hook in cfg.hooks:
            locks.enter_context(write_lock(out / hook))
        return _collect_locked(cfg, model, out, progress)


def _collect_locked(
    cfg: CollectConfig, model: HostModel, out: Path, progress: Callable[[CollectProgress], None] | None
) -> dict[str, ActivationStore]:
    writers = {}
    for hook in cfg.hooks:
        directory = out / hook
        writers[hook] = ShardWriter(directory, _resume_manifest(directory, _manifest_for(cfg, model, hook)))
    done = min(w.tokens for w in writers.values())
    for w in writers.values():  # hooks may have stopped one shard apart: start all at the common point
        w.manifest["shards"] = w.manifest["shards"][: done // cfg.tokens_per_shard]
        w.manifest["tokens"] = w.tokens
        w.manifest["bytes"] = sum((w.dir / s["file"]).stat().st_size for s in w.manifest["shards"])
    start_tokens, t0, seen = done, time.perf_counter(), 0
    complete = False
    try:
        if done < cfg.tokens:
            docs = iter_documents(cfg.data)
            data = cfg.data
            windows = token_batches(
                docs, model.tokenizer, data.context_size, cfg.batch_size, data.pack, data.exclude_first
            )
            # closing joins the prefetch thread however the loop ends (an error included), not at garbage collection
            with contextlib.closing(in_background(windows)) as batches:
                for batch in batches:
                    n_valid = int(batch.valid.sum())
                    if seen + n_valid <= done:  # already in the store: skip without running the model
                        seen += n_valid
                        continue
                    _, cache = model.run_with_cache(batch.tokens, cfg.hooks, return_logits=False)
                    skip, take = done - seen, min(n_valid, cfg.tokens - seen)
                    positions = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
                    ids = torch.stack([batch.tokens[batch.valid], positions[batch.valid]], dim=1)[skip:take]
                    for hook in cfg.hooks:
                        acts = cache[hook][batch.valid.to(cache[hook].device)][skip:take]
                        if not torch.isfinite(acts).all():
                            raise DataError(
                                f"NaN or inf activations at {hook} (tokens {done}..{done + len(acts)}); "
                                "nothing after the last complete shard was written"
                            )
                        writers[hook].add(acts, ids)
                    seen += n_valid
                    done = min(seen, cfg.tokens)
                    if progress is not None:
                        progress(
                            CollectProgress(
                                done,
                                cfg.tokens,
                                sum(w.manifest["bytes"] for w in writers.values()),
                                time.perf_counter() - t0,
                            )
                        )
                    if done >= cfg.tokens:
                        break
        if done == 0:
            raise DataError(f"the corpus {', '.join(cfg.data.specs)} gave no tokens (empty, or empty after filtering)")
        if done < cfg.tokens:
            log.warning("the corpus ran out after %d of %d tokens; the store holds %d", done, cfg.tokens, done)
        complete = True
    finally:
        errors = []
        for w in writers.values():
            try:
                w.close(complete)
            except Exception as e:
                errors.append(e)
        if errors and complete:
            raise errors[0]
    log.info("collected %d tokens (%d new) per hook into %s", done, done - start_tokens, out)
    return {hook: ActivationStore(out / hook, verify=False) for hook in cfg.hooks}


# ---- two models on the same tokens (model diffing) ----------------------------------------------------------
PAIR_FILE = "pair.json"
PROBE = "def f(x):\n    return x ** 2  # Привет, 世界! naïve café 12345 \t  The quick brown fox.\n\n"


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """Why two tokenizers would split text differently (None when they agree): a diff needs one tokenizer."""
    vocab = lambda t: t.tok.get_vocab() if hasattr(getattr(t, "tok", None), "get_vocab") else None
    if a.vocab_size != b.vocab_size:
        return f"vocabularies of {a.vocab_size} and {b.vocab_size} tokens"
    if a.bos_id != b.bos_id:
        return f"BOS ids {a.bos_id} and {b.bos_id}"
    va, vb = vocab(a), vocab(b)
    if va is not None and vb is not None and va != vb:
        return "vocabularies with other tokens"
    if a.encode(PROBE) != b.encode(PROBE):
        return "other splits of the same text"
    return None


def check_pair(a: Any, b: Any, hooks: list[str], specs: tuple[str, str]) -> None:
    """Two models can be diffed at these hooks: one tokenizer, and the same width at each hook (else one line)."""
    why = tokenizer_difference(a.tokenizer, b.tokenizer)
    if why:
        raise ConfigError(f"--model {specs[0]} and --model {specs[1]} tokenize differently ({why}); a diff needs one")
    for hook in hooks:
        if a.hook_dim(hook) != b.hook_dim(hook):
            raise ConfigError(f"{hook} is {a.hook_dim(hook)} wide in {specs[0]} and {b.hook_dim(hook)} in {specs[1]}")


def collect_pair(
    cfg: CollectConfig, other: str, progress: Callable[[str, CollectProgress], None] | None = None
) -> dict[str, dict[str, ActivationStore]]:
    """Model diffing: cfg's hooks of cfg.model (A) and of `other` (B) on the same token windows, into
    cfg.out/A/HOOK and cfg.out/B/HOOK (each exactly what a one-model collect of it writes: the windows follow from
    the text and the shared tokenizer), with pair.json naming the two; progress(name, p) for each."""
    specs = {"A": cfg.model, "B": other}
    load = lambda spec: load_model(
        spec, device=cfg.device, dtype=model_dtype(cfg.model_dtype, cfg.device), tokenizer=cfg.tokenizer
    )
    models = {name: load(spec) for name, spec in specs.items()}
    check_pair(models["A"], models["B"], cfg.hooks, (cfg.model, other))
    out = Path(cfg.out)
    stores = {}
    for name, model in models.items():
        one = dataclasses.replace(cfg, model=specs[name], out=str(out / name))
        stores[name] = collect(one, model, None if progress is None else functools.partial(progress, name))
    write_json(out / PAIR_FILE, {"A": models["A"].name, "B": models["B"].name, "hooks": list(cfg.hooks)})
    return stores
