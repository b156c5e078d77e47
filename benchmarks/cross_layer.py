"""Per-layer transcoders against a cross-layer transcoder on SmolLM2-135M at the same budget: the same streamed
tokens, batches, d_sae and k per layer. Reports training time, how well each stands in for every MLP at once
(CE-loss score, FVU by layer) and the demo prompt's attribution graph (time, replacement and completeness).

Usage: python benchmarks/cross_layer.py [--tokens 40000] [--d-sae 1024] [--k 16] [--batch-size 512]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _results import save


def main() -> None:
    from nanosae import DataConfig
    from nanosae.demo import CIRCUIT_PROMPT
    from nanosae.interp import circuits as C
    from nanosae.models import load_model
    from nanosae.rundir import TranscoderSetDir
    from nanosae.train import train
    from nanosae.train.sweep import transcoder_set

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-feature-nodes", type=int, default=512)
    p.add_argument("--out", default=None, help="where the two sets go (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(2)
    root = Path(args.out or tempfile.mkdtemp(prefix="nanosae-clt-"))
    model = load_model("smollm2-135m")
    layers = list(range(model.n_layers))
    data = lambda split: DataConfig(specs=["builtin:pydocs", "builtin:stdlib"], split=split, context_size=256)
    rows = {}
    for kind in ("per-layer", "cross-layer"):
        out = root / kind
        settings = {
            "model": "smollm2-135m",
            "data": data("train"),
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_size": args.batch_size,
            "tokens": args.tokens,
            "checkpoint_every": 0,
            "log_every": 10,
            "out": str(out),
            "cross_layer": kind == "cross-layer",
        }
        t0 = time.perf_counter()
        train(transcoder_set(settings, layers))
        trained = time.perf_counter() - t0
        TranscoderSetDir(out).write_manifest("smollm2-135m", layers, kind == "cross-layer")
        _, tcs = C.load_transcoders(out)
        scores = C.replacement_scores(model, tcs, data("eval"))
        t0 = time.perf_counter()
        graph = C.attribute(model, tcs, CIRCUIT_PROMPT, max_feature_nodes=args.max_feature_nodes)
        traced = time.perf_counter() - t0
        g = C.scores(graph)
        fvu = list(scores["fvu_by_layer"].values())
        rows[kind] = {
            "train_s": trained,
            "ce_score": scores["replacement_ce_score"],
            "ce_replaced": scores["ce_loss_replaced"],
            "fvu_mean": sum(fvu) / len(fvu),
            "fvu_by_layer": fvu,
            "trace_s": traced,
            **g,
            "active_features": graph.info["active_features"],
        }
    print(
        f"SmolLM2-135M, 30 layers, d_sae {args.d_sae}/layer, k {args.k}, {args.tokens:,} streamed tokens, batch "
        f"{args.batch_size}, 2 threads; graph: the demo prompt, {args.max_feature_nodes} traced features"
    )
    print(
        f"{'':12} {'train s':>8} {'CE score':>9} {'CE repl.':>9} {'mean FVU':>9} "
        f"{'trace s':>8} {'repl.':>6} {'compl.':>7}"
    )
    for kind, r in rows.items():
        print(
            f"{kind:12} {r['train_s']:8.0f} {r['ce_score']:9.3f} {r['ce_replaced']:9.3f} {r['fvu_mean']:9.3f} "
            f"{r['trace_s']:8.1f} {r['replacement_score']:6.3f} {r['completeness_score']:7.3f}"
        )
    save(
        __file__,
        {
            "tokens": args.tokens,
            "d_sae": args.d_sae,
            "k": args.k,
            "batch_size": args.batch_size,
            "max_feature_nodes": args.max_feature_nodes,
            **{k.replace("-", "_"): v for k, v in rows.items()},
        },
    )


if __name__ == "__main__":
    main()
