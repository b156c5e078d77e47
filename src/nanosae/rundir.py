"""The run directory: where one training run and everything made from it live.

    RUN/config.json        the TrainConfig (and the stores' fingerprints)
    RUN/sae/               the final SAE (cfg.json + sae_weights.safetensors)
    RUN/checkpoints/step_N/
    RUN/metrics.jsonl      training metrics, one line per logged step
    RUN/eval.json, RUN/report.html, RUN/features.db

Every command that takes "a run directory or an SAE" resolves it here, and finds the host model here.

A transcoder set (`train --transcoders`) is a directory of such runs, one per layer (TranscoderSetDir):

    SET/transcoders.json   the manifest: the model, cross_layer, and per layer the run directory (layer_L)
    SET/layer_L/           one training run (its features.db too, once built)
    SET/cross_layer/       a cross-layer set's coupled checkpoints
    SET/replacement.json   every MLP replaced at once: the set's scores
    SET/graphs/SLUG.json   attribution graphs (Neuronpedia's layout)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanosae.errors import ConfigError, FormatError
from nanosae.io import is_number, read_json, write_json
from nanosae.outputs import check_outside_jobs
from nanosae.sae.foreign import is_hub


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def sae(self) -> Path:
        return self.path / "sae"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def features(self) -> Path:
        return self.path / "features.db"


MAX_LAYERS = 4096
GRAPH_SLUG = "^[a-z0-9][a-z0-9-]{0,63}$"
GRAPH_INDEX = "graph-metadata.json"  # beside the graphs: the index circuit-tracer's local server reads


def graph_slug(text: str) -> str:
    """A graph's name made from text (lowercase letters, digits and dashes), never the graphs' index's."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "graph"
    return slug + "-graph" if f"{slug}.json" == GRAPH_INDEX else slug


def new_graph_file(out: Path, home: Path) -> None:
    """Refuse a graph file that exists (it may hold pinned nodes and supernodes), that would be the graphs' index,
    or that lies inside another job's folder (anywhere under `home` is fine)."""
    if out.name == GRAPH_INDEX:
        raise ConfigError(f"{out} is where the graphs' index goes; give another --out")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} exists (it may hold pinned nodes and supernodes); give another --out")
    check_outside_jobs(out, home=home)


@dataclass(frozen=True)
class TranscoderSetDir:
    """The layout of a transcoder set (see the module docstring); the one place that knows it."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "transcoders.json"

    @property
    def replacement(self) -> Path:
        return self.path / "replacement.json"

    @property
    def graphs(self) -> Path:
        return self.path / "graphs"

    @property
    def cross_layer(self) -> Path:
        return self.path / "cross_layer"

    def layer(self, layer: int) -> Path:
        """Where a layer's transcoder run goes when the set is trained (the manifest says where it went)."""
        return self.path / f"layer_{layer}"

    def exists(self) -> bool:
        return self.manifest.is_file()

    def write_manifest(self, model: str, layers: list[int], cross_layer: bool = False) -> None:
        write_json(
            self.manifest,
            {
                "model": model,
                "cross_layer": cross_layer,
                "layers": {str(k): self.layer(k).name for k in sorted(layers)},
            },
        )

    def read_manifest(self) -> dict[str, Any]:
        """transcoders.json, checked: a model string, a cross_layer flag, and layers {"L": "dir"} with L a layer
        number and dir a relative path inside the set (no absolute paths, no `..`, no links out of it)."""
        run, path = self.path, self.manifest
        if not path.exists():
            raise FormatError(f"{run}: no {path.name} (train a set with `nanosae train --transcoders all --out {run}`)")
        manifest = read_json(path)
        layers, root = manifest.get("layers"), run.resolve()
        if not isinstance(manifest.get("model"), str) or not manifest["model"]:
            raise FormatError(f"{path}: model must be a non-empty string")
        if not isinstance(manifest.get("cross_layer", False), bool):
            raise FormatError(f"{path}: cross_layer must be true or false")
        if not isinstance(layers, dict) or not layers:
            raise FormatError(f'{path}: layers must be an object of layer number -> directory, e.g. {{"0": "layer_0"}}')
        for key, where in layers.items():
            if not (is_number(key) and int(key) < MAX_LAYERS):
                raise FormatError(f"{path}: layer {key[:20]!r} is not a layer number (0..{MAX_LAYERS - 1})")
            if (
                not isinstance(where, str)
                or not where
                or Path(where).is_absolute()
                or ".." in Path(where).parts
                or not (run / where).resolve().is_relative_to(root)
            ):
                raise FormatError(
                    f"{path}: layer {key}'s directory {str(where)[:60]!r} must be a relative path inside {run}"
                )
        return manifest

    def layer_runs(self) -> dict[int, Path]:
        """Each layer's run directory, as the manifest records it."""
        return {int(layer): self.path / where for layer, where in self.read_manifest()["layers"].items()}

    def graph(self, slug: str) -> Path:
        """A graph's file by its slug, or a ConfigError for a slug that is not one (a path in disguise)."""
        if not re.fullmatch(GRAPH_SLUG, slug):
            raise ConfigError(f"{slug[:70]!r} is not a graph name (lowercase letters, digits and dashes)")
        return self.graphs / f"{slug}.json"

    def graph_names(self) -> list[str]:
        return sorted(
            p.stem
            for p in self.graphs.glob("*.json")
            if p.is_file() and re.fullmatch(GRAPH_SLUG, p.stem) and p.name != GRAPH_INDEX
        )

    def new_graph(self, prompt: str, out: Path | None = None, slug: str | None = None) -> tuple[str, Path]:
        """(slug, file) for a new graph of prompt: out, or graphs/SLUG.json (the slug made from out's name or the
        prompt unless given), claimed as new_graph_file does, this set being its home."""
        # the slug names the file, as circuit-tracer's server finds graphs (SLUG.json): --out's name, or the prompt
        slug = slug or graph_slug(out.stem if out is not None else prompt)
        out = out or self.graph(slug)
        new_graph_file(out, home=self.path)
        return slug, out


def locate(path: str | Path) -> tuple[RunDir | None, Path]:
    """(the run, or None, and the SAE path): a run directory holds sae/cfg.json; anything else is an SAE file
    or directory (ours, SAELens, OpenAI .pt)."""
    path = Path(path)
    if (path / "sae" / "cfg.json").exists():
        return RunDir(path), path / "sae"
    return None, path


def home(path: str | Path) -> Path:
    """Where files made from an SAE go: its run directory, the SAE directory itself, or a .pt file's folder.
    A Hub id has none: its files go where --out says."""
    _refuse_hub(path)
    run, sae = locate(path)
    return run.path if run else sae if sae.is_dir() else sae.parent


def own_home(path: str | Path) -> Path | None:
    """The folder outputs made from this SAE may sit inside (outputs.check_outside_jobs), or None for a Hub id."""
    return None if is_hub(path) else home(path).resolve()


def _refuse_hub(path: str | Path) -> None:
    if is_hub(path):
        raise ConfigError(f"{path} is a Hub id: nothing is written into the Hugging Face cache; give --out")


def eval_path(run: RunDir | None, sae: Path) -> Path:
    """Where an SAE's eval.json goes: its run directory, its own directory, or beside a .pt file (NAME.eval.json)."""
    if run is not None:
        return run.eval
    return sae.with_suffix(".eval.json") if sae.is_file() else sae / "eval.json"


def report_dir(located: list[tuple[RunDir | None, Path]]) -> Path:
    """Where one report over these SAEs goes: the run directory of a single run, else the folder above them."""
    if len(located) == 1 and located[0][0] is not None:
        return located[0][0].path
    run, sae = located[0]
    _refuse_hub(sae)
    return (run.path if run else sae).resolve().parent


def model_spec(sae: Any, model: str | None, where: str | Path = "") -> str:
    """The host model to run an SAE on: the one asked for, else the one the SAE was trained on."""
    spec = model or sae.cfg.model_name
    if not spec:
        raise ConfigError(f"{where or 'the SAE'}: the SAE does not name its model (cfg.json model_name); pass --model")
    return spec


def load_sae_and_model(
    path: str | Path, model: str | None = None, device: str = "cpu", tokenizer: str | Path | None = None
) -> tuple[RunDir | None, Any, Any]:
    """(run or None, SAE, host model) for a run directory or SAE path; the model defaults to the SAE's own."""
    from nanosae.models import load_model
    from nanosae.sae import SAE

    run, sae_path = locate(path)
    sae = SAE.load(sae_path, device=device)
    host = load_model(model_spec(sae, model, path), device=device, tokenizer=tokenizer)
    check_fit(sae, host, path)
    return run, sae, host


def check_fit(sae: Any, host: Any, where: str | Path) -> None:
    """An SAE from elsewhere must read the width its hook has in this model: one line naming the file otherwise
    (an SAE trained for another model, or another layer count)."""
    from nanosae.errors import HookError, ShapeError

    hook = sae.cfg.hook_name
    if not hook or sae.cfg.kind == "crosscoder":
        return
    try:
        width = host.hook_dim(hook)
    except HookError:
        if re.match(r"blocks\.(\d+)\.", hook) and int(hook.split(".")[1]) >= host.n_layers:
            raise HookError(
                f"{where} reads {hook}, but {host.name} has {host.n_layers} layers (0..{host.n_layers - 1})"
            ) from None
        return  # a site nanosae has no hook for: the command names the valid ones when it uses it (or --hook)
    if width != sae.cfg.d_in:
        raise ShapeError(
            f"{where} reads {sae.cfg.d_in}-wide activations at {hook}, but {host.name} has {width} there "
            "(an SAE of another model? give --model)"
        )
