"""nanosae's attribution graphs beside circuit-tracer's (0.5.0) on the same model, transcoder set and prompt.

    make ct-venv && .venv/bin/python benchmarks/circuit_tracer.py [--transcoders SET] [--prompt TEXT]

The model is SmolLM2-135M-Instruct from the embedded weights: nanosae runs it as it always does (in .venv), and
circuit-tracer gets the same dequantized weights as a TransformerLens model (in .venv-ct, since circuit-tracer pins
transformers < 5). The set is a directory in circuit-tracer's layout, which both load: a set of yours
(`nanosae export circuit-tracer RUN --out SET`), or by default a random JumpReLU set of the model's shape whose
thresholds are set on the prompt's own activations so each layer has about --l0 active features per token. Each
tool runs in its own process (time and peak memory are its own); the graphs are compared node by node after
matching ids: the active features, the logit targets, every edge (relative to the largest), and both scores.
Then each tool zeroes the three features with the largest edges into the top logit (at earlier positions) in
circuit-tracer's three intervention modes (the model as it runs, frozen attention, every layer constrained) and the
next-token logits are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".venv-ct" / "bin" / "python"
PROMPT = "The Eiffel Tower is in the city of"
MODES = {"live": (False, False), "frozen attention": (True, False), "constrained": (True, True)}


def strongest(features: torch.Tensor, adjacency: torch.Tensor, n_logits: int, n: int = 3) -> list[list[int]]:
    """(layer, position, latent) of the n features at earlier positions with the largest edges into the top logit:
    each tool picks from its own graph, so equal graphs pick equal features."""
    last = int(features[:, 1].max())
    row = adjacency[len(adjacency) - n_logits, : len(features)].abs().float()
    row[features[:, 1] == last] = 0
    return [features[i].tolist() for i in row.topk(n).indices.tolist()]


def run_nanosae(args: argparse.Namespace) -> dict:
    from nanosae.interp import circuits as C
    from nanosae.models import load_model

    model = load_model("smollm2-135m")
    _, tset = C.load_transcoders(args.transcoders)
    tokens = model.prompt_ids(args.prompt)
    start = time.perf_counter()
    graph = C.attribute(model, tset, tokens, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    edits = [((L, f, p), "=", 0.0) for L, p, f in strongest(graph.features, graph.adjacency, len(graph.logit_tokens))]
    edited = {}
    ids = torch.tensor([tokens])
    for mode, (freeze, constrain) in MODES.items():
        constrained = range(model.n_layers) if constrain else ()
        with torch.no_grad(), C.feature_edits(model, tset, ids, edits, freeze, constrained):
            edited[mode] = model.forward(ids)[0, -1].float()
    torch.save(
        {
            "edited": edited,
            "tokens": tokens,
            "features": graph.features,
            "adjacency": graph.adjacency,
            "logit_tokens": graph.logit_tokens,
            "logit_probs": graph.logit_probs,
            "active": graph.info["active_features"],
            "layers": graph.layers,
        },
        args.result,
    )
    return {"seconds": seconds, **C.scores(graph)}


def tl_model(hf_dir: Path):
    """The embedded SmolLM2 as a TransformerLens model circuit-tracer can wrap (TransformerLens does not know its
    name, so its config is built from the weights' own config.json)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM

    copy = Path(tempfile.mkdtemp())
    for f in hf_dir.iterdir():
        if f.name not in ("config.json", "tokenizer_config.json"):
            os.symlink(f, copy / f.name)
    config = json.loads((hf_dir / "config.json").read_text()) | {"architectures": ["LlamaForCausalLM"]}
    # transformers 5 writes rope_parameters; transformers 4 reads rope_theta, else uses 10000 (SmolLM2's is 1e5)
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
    (copy / "config.json").write_text(json.dumps(config))
    tok = json.loads((hf_dir / "tokenizer_config.json").read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    (copy / "tokenizer_config.json").write_text(json.dumps(tok))  # the class name transformers 5 wrote
    # TransformerLens's generic Llama config leaves the rotary base at 10000
    fields = convert_hf_model_config(str(copy)) | {"tokenizer_name": str(copy), "rotary_base": config["rope_theta"]}
    cfg = HookedTransformerConfig(
        **{k: v for k, v in fields.items() if k in HookedTransformerConfig.__dataclass_fields__},
        device="cpu",
        dtype=torch.float32,
    )
    hf = AutoModelForCausalLM.from_pretrained(copy, torch_dtype=torch.float32)
    return cfg, convert_llama_weights(hf, cfg)


def run_circuit_tracer(args: argparse.Namespace) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from transformer_lens import HookedTransformer

    set_dir = Path(args.transcoders).resolve()
    transcoders, _ = load_transcoders_from_cache(
        set_dir.name, cache_dir=set_dir.parent, device=torch.device("cpu"), dtype=torch.float32
    )
    cfg, state = tl_model(Path(args.hf_dir))
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    model.__class__ = TransformerLensReplacementModel  # as from_pretrained_and_transcoders makes it
    model._configure_replacement_model(transcoders)
    tokens = torch.tensor(json.loads(args.tokens))
    start = time.perf_counter()
    graph = attribute(tokens, model, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    replacement, completeness = compute_graph_scores(graph)
    features = graph.active_features[graph.selected_features]
    edits = [(L, p, f, 0.0) for L, p, f in strongest(features, graph.adjacency_matrix, len(graph.logit_targets))]
    edited = {}
    for mode, (freeze, constrain) in MODES.items():
        constrained = range(cfg.n_layers) if constrain else None
        logits, _ = model.feature_intervention(tokens, edits, constrained_layers=constrained, freeze_attention=freeze)
        edited[mode] = logits[0, -1].float()
    torch.save(
        {
            "edited": edited,
            "features": graph.active_features[graph.selected_features],
            "adjacency": graph.adjacency_matrix,
            "logit_tokens": [t.vocab_idx for t in graph.logit_targets],
            "logit_probs": graph.logit_probabilities.tolist(),
            "active": len(graph.active_features),
        },
        args.result,
    )
    return {"seconds": seconds, "replacement_score": float(replacement), "completeness_score": float(completeness)}


def child(tool: str, args: argparse.Namespace, result: Path, extra: list[str]) -> dict:
    python = sys.executable if tool == "nanosae" else str(CT_PYTHON)
    # -P: this file is named like the package it benchmarks, and must not shadow it
    cmd = [python, "-P", __file__, "--run", tool, "--result", str(result), "--transcoders", str(args.transcoders)]
    cmd += ["--prompt", args.prompt, "--max-feature-nodes", str(args.max_feature_nodes)]
    cmd += ["--batch-size", str(args.batch_size), "--allocator", args.allocator] + extra
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tool} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ordered(saved: dict) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The features in (layer, position, latent) order and the adjacency permuted to match (features first,
    then errors, tokens and logits, which both tools lay out alike)."""
    feats = [tuple(f) for f in saved["features"].tolist()]
    order = sorted(range(len(feats)), key=lambda i: feats[i])
    n = len(saved["adjacency"])
    perm = torch.tensor(order + list(range(len(feats), n)))
    return [feats[i] for i in order], saved["adjacency"].float()[perm][:, perm]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoders", type=Path, help="a set in circuit-tracer's layout (default: a random one)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-feature-nodes", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--l0", type=float, default=8.0)
    p.add_argument(
        "--allocator",
        choices=["default", "tuned"],
        default="default",
        help="tuned: both processes keep freed memory for reuse (keep_freed_memory, as the nanosae command sets)",
    )
    p.add_argument("--run", choices=["nanosae", "circuit-tracer"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        if args.allocator == "tuned":
            from nanosae.models import keep_freed_memory

            keep_freed_memory()
        report = (run_nanosae if args.run == "nanosae" else run_circuit_tracer)(args)
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(report))
        return
    if not CT_PYTHON.exists():
        sys.exit("circuit-tracer's venv is missing: make ct-venv")
    work = Path(tempfile.mkdtemp(prefix="nanosae-ct-"))
    if args.transcoders is None:
        args.transcoders = work / "random-set"
        from _random_set import smollm2_set

        smollm2_set(args.transcoders, args.d_sae, args.l0)
    from nanosae.models import load_model
    from nanosae.models.hf import dequantized_dir, smollm2_gguf

    tokens = load_model("smollm2-135m").prompt_ids(args.prompt)
    ours = child("nanosae", args, work / "nanosae.pt", [])
    extra = ["--tokens", json.dumps(tokens), "--hf-dir", str(dequantized_dir(smollm2_gguf()))]
    theirs = child("circuit-tracer", args, work / "ct.pt", extra)
    a, b = torch.load(work / "nanosae.pt"), torch.load(work / "ct.pt")
    fa, A = ordered(a)
    fb, B = ordered(b)
    print(f"prompt {args.prompt!r}: {len(tokens)} tokens; set {args.transcoders}")
    print(f"active features: nanosae {a['active']}, circuit-tracer {b['active']}; traced {len(fa)} / {len(fb)}")
    print(f"logit targets equal: {a['logit_tokens'] == b['logit_tokens']} ({a['logit_tokens']} / {b['logit_tokens']})")
    if fa == fb and A.shape == B.shape:
        scale = float(B.abs().max())
        diff = (A - B).abs()
        print(
            f"edges: max |difference| {float(diff.max()) / scale:.2e} of the largest edge; "
            f"{int((diff > 1e-3 * scale).sum())} of {int((B != 0).sum())} nonzero edges differ by more than 1e-3"
        )
    else:
        print(f"node sets differ: {len(set(fa) ^ set(fb))} features in one graph only")
    with torch.no_grad():
        clean = load_model("smollm2-135m").forward(torch.tensor([tokens]))[0, -1].float()
    for mode in MODES:
        moved = float((b["edited"][mode] - clean).abs().max())
        diff = float((a["edited"][mode] - b["edited"][mode]).abs().max())
        print(f"zeroing the 3 strongest features, {mode}: logits moved up to {moved:.3f}, tools differ by {diff:.1e}")
    for key in ("replacement_score", "completeness_score"):
        print(f"{key}: nanosae {ours[key]:.4f}, circuit-tracer {theirs[key]:.4f}")
    print(
        f"time: nanosae {ours['seconds']:.1f} s, circuit-tracer {theirs['seconds']:.1f} s "
        f"({theirs['seconds'] / ours['seconds']:.2f}x); peak RSS: nanosae {ours['peak_rss_mb']:.0f} MB, "
        f"circuit-tracer {theirs['peak_rss_mb']:.0f} MB ({ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x)"
    )


if __name__ == "__main__":
    main()
