"""Several SAEs from one command: every --acts / --hook value and every combination of the sweep fields'
values becomes a TrainConfig, each in its own folder of the run directory named by what varies."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from nanosae.config import OptimConfig, SourceConfig, TrainConfig, default_batch_size
from nanosae.errors import ConfigError
from nanosae.rundir import TranscoderSetDir

SWEEPABLE = ("architecture", "d_sae", "k", "sparsity_coefficient")
SET_BATCH_FLOOR = 256  # tokens per step of a transcoder set when --batch-size is not given
"""Settings that take several comma-separated values on the command line; each combination is one SAE."""


def expand_sweep(settings: dict[str, Any], crosscoder: bool = False) -> list[TrainConfig]:
    """settings: TrainConfig.build's names, where `acts` and `hook` are lists (one run per value, or one
    crosscoder over all of them) and SWEEPABLE names may be lists. Returns the configs, trained together."""
    settings = dict(settings)
    if settings.get("cross_layer"):
        raise ConfigError("--cross-layer trains a set of layers: give it with --transcoders all (or layers like 0,1,2)")
    acts, hooks = settings.pop("acts", None) or [], settings.pop("hook", None) or [SourceConfig.hook]
    sources = [("acts", str(a)) for a in acts] if acts else [("hook", h) for h in hooks]
    if crosscoder:
        key = "crosscoder_acts" if acts else "crosscoder_hooks"
        settings[key] = [where for _, where in sources]
        sources = [("crosscoder", "")]
    elif (settings.get("hook_out") or settings.get("acts_out")) and len(sources) > 1:
        raise ConfigError("a transcoder reads one hook (--hook or --acts) and predicts --hook-out / --acts-out")
    grid = {name: _as_list(settings.pop(name)) for name in SWEEPABLE if name in settings}
    out = Path(settings.pop("out", TrainConfig.out))
    cfgs = []
    for (kind, where), *values in itertools.product(sources, *grid.values()):
        chosen = dict(zip(grid, values))
        parts = [Path(where).name if len(sources) > 1 else ""]
        parts += [_label(name, value) for name, value in chosen.items() if len(grid[name]) > 1]
        name = "-".join(p for p in parts if p)
        place = {"acts": where} if kind == "acts" else {"hook": where} if kind == "hook" else {}
        cfgs.append(
            TrainConfig.build(
                out=str(out / name if name else out),
                **settings,
                **place,
                **{k: v for k, v in chosen.items() if v is not None},
            )
        )
    return cfgs


def _as_list(value: Any) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError("a swept setting was given no values (e.g. --architecture ,)")
    return values


def _label(name: str, value: Any) -> str:
    return str(value) if name == "architecture" else f"{name}={value}"


def transcoder_set(settings: dict[str, Any], layers: list[int]) -> list[TrainConfig]:
    """One transcoder per layer, reading blocks.L.ln2.hook_normalized and predicting blocks.L.hook_mlp_out, all
    trained together from one forward pass per batch, each in RUN/layer_L (the set's manifest goes in RUN).
    With cross_layer, each layer's features also write to every later layer's MLP output (train.cross_layer)."""
    settings = dict(settings)
    for name in ("acts", "acts_out", "hook", "hook_out", "crosscoder_hooks", "crosscoder_acts"):
        if settings.pop(name, None) not in (None, [], SourceConfig.hook, [SourceConfig.hook]):
            raise ConfigError(f"--transcoders chooses each transcoder's hooks; {name} cannot be given with it")
    for name in SWEEPABLE:
        if isinstance(settings.get(name), (list, tuple)):
            if len(settings[name]) > 1:
                raise ConfigError(f"--transcoders trains one set: give one value of {name}")
            settings[name] = settings[name][0]
    tokens = settings.get("tokens", OptimConfig.tokens)
    if settings.get("batch_size") is None and isinstance(tokens, int):
        # each step runs the model once for every layer's transcoder: tiny batches make a set slow for nothing
        settings["batch_size"] = min(tokens, max(SET_BATCH_FLOOR, default_batch_size(tokens)))
    tset = TranscoderSetDir(Path(settings.pop("out", TrainConfig.out)))
    return [
        TrainConfig.build(
            out=str(tset.layer(layer)),
            hook=f"blocks.{layer}.ln2.hook_normalized",
            hook_out=f"blocks.{layer}.hook_mlp_out",
            **settings,
        )
        for layer in layers
    ]
