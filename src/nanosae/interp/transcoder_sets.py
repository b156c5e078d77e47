"""A transcoder set end to end: train one (one transcoder per layer from one forward pass), score it with every
MLP replaced at once, and trace prompts through it into graph files. The CLI and the demo call these."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from nanosae.config import DataConfig, PruneConfig, TraceConfig, TrainConfig
from nanosae.data import iter_documents
from nanosae.errors import ConfigError, NanosaeError
from nanosae.interp.circuits import (
    Graph,
    attribute,
    available_memory,
    graph_tensors_path,
    load_graph,
    load_transcoders,
    replacement_scores,
    save_graph,
    to_neuronpedia,
)
from nanosae.interp.featuredb import explanations
from nanosae.io import read_json, write_json
from nanosae.models import HostModel, load_model
from nanosae.rundir import GRAPH_INDEX, TranscoderSetDir, graph_slug, new_graph_file
from nanosae.train import TrainResult, train


class TrainedSet(NamedTuple):
    path: Path
    results: list[TrainResult]
    scores: dict[str, Any]  # replacement.json


class Trace(NamedTuple):
    graph: Graph
    data: dict[str, Any]  # the graph file's contents (Neuronpedia's layout)
    out: Path


def scoring_data(data: DataConfig) -> DataConfig:
    """The held-out split (every 20th document), or all the text when it holds none (fewer than 20 documents)."""
    held_out = dataclasses.replace(data, split="eval")
    return (
        held_out if next(iter(iter_documents(held_out)), None) is not None else dataclasses.replace(data, split="all")
    )


def train_set(
    cfgs: list[TrainConfig],
    layers: list[int],
    progress: Callable[[Any], None] | None = None,
    model: HostModel | None = None,
) -> TrainedSet:
    """Train the set's transcoders (train.sweep.transcoder_set's configs), write its manifest, and score it on
    held-out text into replacement.json. model: the host already loaded, when the caller has it."""
    scoring = scoring_data(cfgs[0].source.data)  # settled before the work: the set is scored after it
    results = train(cfgs, progress=progress)
    tset = TranscoderSetDir(Path(cfgs[0].out).parent)
    tset.write_manifest(cfgs[0].source.model, layers, cfgs[0].sae.cross_layer)
    return TrainedSet(tset.path, results, score_set(tset.path, scoring, model, cfgs[0].device))


def score_set(path: Path, data: DataConfig, model: HostModel | None = None, device: str = "cpu") -> dict[str, Any]:
    """replacement.json: the set's scores with every MLP replaced at once, on `data`."""
    tset = TranscoderSetDir(path)
    spec, tcs = load_transcoders(tset.path, device)
    host = model or load_model(spec, device=device)
    scores = replacement_scores(host, tcs, data) | {"scored_on": data.split, "model_layers": host.n_layers}
    write_json(tset.replacement, scores)
    return scores


def read_scores(path: Path) -> dict[str, Any]:
    return read_json(TranscoderSetDir(path).replacement)


def trace(
    prompt: str,
    cfg: TraceConfig,
    model: HostModel | None = None,
    slug: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_estimate: Callable[[int], None] | None = None,
) -> Trace:
    """An attribution graph of prompt over cfg.transcoders, pruned and written in Neuronpedia's layout to
    cfg.out (default: a nanosae set's graphs/SLUG.json), with each feature's explanation as its label.
    Another tool's set (circuit-tracer's, by path or Hub id) needs --out and, when it names no model, --model."""
    from nanosae.interp.circuit_tracer import scan_name

    tset = TranscoderSetDir(Path(cfg.transcoders))
    ours = tset.exists()
    if not ours and not cfg.out:
        raise ConfigError(f"{cfg.transcoders} is not a nanosae set: give --out for the graph file")
    slug, out = tset.new_graph(prompt, Path(cfg.out) if cfg.out else None, slug)
    spec, tcs = load_transcoders(cfg.transcoders, cfg.device)
    spec = host_spec(cfg.transcoders, spec, cfg.model)
    host = model or load_model(spec, device=cfg.device)
    targets = [one_token(host, text, "--target") for text in cfg.targets]
    graph = attribute(
        host,
        tcs,
        prompt,
        max_feature_nodes=cfg.max_feature_nodes,
        batch_size=cfg.batch_size,
        targets=targets or None,
        contrast=one_token(host, cfg.versus, "--versus") if cfg.versus is not None else None,
        memory_limit=available_memory(),
        on_estimate=on_estimate,
        progress=progress,
    )
    graph.transcoders = str(cfg.transcoders)
    data = to_neuronpedia(
        graph,
        slug=slug,
        node_share=cfg.node_threshold,
        edge_share=cfg.edge_threshold,
        rank_tokens=cfg.rank_tokens,
        n_layers=host.n_layers,
        labels=labels_of(tset),
        scan=scan_name(cfg.scan or spec),
    )
    return write_graph(graph, data, out)


def write_graph(graph: Graph, data: dict[str, Any], out: Path) -> Trace:
    """The graph file, the unpruned graph beside it, and its entry in the graphs' index."""
    save_graph(graph, graph_tensors_path(out))
    write_json(out, data)
    index_graph(out, data)
    return Trace(graph, data, out)


def index_graph(graph_file: Path, data: dict[str, Any]) -> None:
    """Add (or replace) the graph in graph-metadata.json beside it: the index circuit-tracer's local server
    (`circuit_tracer.frontend.local_server.serve(data_dir=...)`) lists graphs from, so it shows nanosae's too."""
    index = graph_file.parent / GRAPH_INDEX
    keys = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version")
    entry = {k: data["metadata"].get(k) for k in keys}
    try:
        graphs = read_json(index).get("graphs", []) if index.exists() else []
    except NanosaeError:  # an unreadable index is rebuilt from this graph; the graphs themselves are untouched
        graphs = []
    graphs = [g for g in graphs if isinstance(g, dict) and g.get("slug") != entry["slug"]] + [entry]
    write_json(index, {"graphs": graphs})


def host_spec(transcoders: str, named: str, given: str | None) -> str:
    """The host model: --model, else the one the set names (a ConfigError when neither says)."""
    if not (given or named):
        raise ConfigError(f"{transcoders} names no model: give --model")
    return given or named


def one_token(host: HostModel, text: str, flag: str) -> int:
    """The id of a token given by its text (a ConfigError when the text is not exactly one token)."""
    ids = host.tokenizer.encode(text)
    if len(ids) != 1:
        pieces = [host.tokenizer.decode([i]) for i in ids]
        raise ConfigError(f"{flag} {text!r} is {len(ids)} tokens {pieces}, expected one (mind the leading space)")
    return ids[0]


def labels_of(tset: TranscoderSetDir) -> dict[tuple[int, int], str]:
    """(layer, latent) -> explanation from each layer's feature database (none for another tool's set)."""
    runs = tset.layer_runs() if tset.exists() else {}
    return {(layer, latent): text for layer in runs for latent, text in explanations(runs[layer]).items()}


def reprune(graph_file: Path, cfg: PruneConfig) -> Trace:
    """The graph traced into `graph_file` pruned again at cfg's thresholds into cfg.out, from the unpruned graph
    saved beside it: no model, no tracing."""
    from nanosae.interp.circuit_tracer import scan_name

    graph = load_graph(graph_tensors_path(graph_file))
    out = Path(cfg.out)
    new_graph_file(out, home=graph_file.resolve().parent)
    tset = TranscoderSetDir(Path(graph.transcoders))
    data = to_neuronpedia(
        graph,
        slug=graph_slug(out.stem),
        node_share=cfg.node_threshold,
        edge_share=cfg.edge_threshold,
        rank_tokens=cfg.rank_tokens,
        n_layers=graph.info.get("n_layers"),
        labels=labels_of(tset),
        scan=scan_name(cfg.scan or graph.model),
    )
    return write_graph(graph, data, out)
