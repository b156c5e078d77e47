"""Attribution on the CPU: SmolLM2-135M with a transcoder at each of its 30 layers (d_sae 4608, k 32) and a
20-token prompt, the time to the graph file (target <= 2 minutes).

Transcoders come from --transcoders RUN (a trained set) or are random TopK transcoders of the same shape (the
cost depends on the number of active features and traced rows, not on what the features mean).
--cross-layer: random cross-layer transcoders (every layer's features also write to every later MLP).
Usage: python benchmarks/circuits.py [--transcoders RUN] [--max-feature-nodes 1024] [--batch-size 32]
       [--cross-layer --d-sae 2048]
"""

import argparse
import time

import torch
from _results import save

PROMPT = "import os\nimport sys\n\ndef main():\n    path = os.path.join(sys.argv[1], 'data')\n    with open("


def random_set(model, d_sae: int = 4608, k: int = 32, cross_layer: bool = False):
    from nanosae import SAE, SAEConfig
    from nanosae.interp.circuits import TranscoderSet, mlp_hooks

    torch.manual_seed(0)
    out = TranscoderSet({})
    n = model.n_layers
    for layer in range(n):
        read, write = mlp_hooks(layer)
        out.by_layer[layer] = SAE(
            SAEConfig(
                d_in=model.d_model,
                d_sae=d_sae,
                architecture="topk",
                k=k,
                hook_name=read,
                hook_name_out=write,
                d_out=model.d_model,
            )
        ).eval()
        if cross_layer and layer < n - 1:  # rows of norm ~1 spread over the layers written to
            out.later[layer] = torch.randn(d_sae, n - 1 - layer, model.d_model) / (model.d_model * (n - layer)) ** 0.5
    return out


def main() -> None:
    import nanosae
    from nanosae.interp.circuits import attribute, load_transcoders, to_neuronpedia

    p = argparse.ArgumentParser()
    p.add_argument("--transcoders")
    p.add_argument("--max-feature-nodes", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cross-layer", action="store_true", help="random cross-layer transcoders instead of per-layer")
    p.add_argument("--d-sae", type=int, default=4608, help="latents per layer of the random set")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if args.transcoders:
        spec, tcs = load_transcoders(args.transcoders)
        model = nanosae.load_model(spec)
    else:
        model = nanosae.load_model("smollm2-135m")
        tcs = random_set(model, args.d_sae, cross_layer=args.cross_layer)
    tokens = [model.tokenizer.bos_id, *model.tokenizer.encode(PROMPT)][:20]
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = attribute(model, tcs, tokens, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    attributed = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = to_neuronpedia(graph, n_layers=model.n_layers)
    pruned = time.perf_counter() - t0
    total = attributed + pruned
    kind = "cross-layer" if tcs.cross_layer else "per-layer"
    print(
        f"SmolLM2-135M, {len(tcs)} {kind} transcoders (d_sae {tcs[0].cfg.d_sae}), {len(tokens)} tokens, "
        f"{graph.info['active_features']} active features, "
        f"{graph.n_features} traced (--max-feature-nodes {args.max_feature_nodes}), "
        f"batch {args.batch_size}, 2 threads"
    )
    print(
        f"load {loaded:.1f} s; attribution {attributed:.1f} s; pruning + JSON {pruned:.1f} s; "
        f"graph in {total:.1f} s (target <= 120 s); kept {len(data['nodes'])} nodes, {len(data['links'])} edges; "
        f"replacement {data['metadata']['info']['replacement_score']:.3f}"
    )
    save(
        "circuits_cross_layer.py" if tcs.cross_layer else __file__,
        {
            "features": graph.info["active_features"],
            "traced": graph.n_features,
            "attribution_s": attributed,
            "prune_json_s": pruned,
            "total_s": total,
            "max_feature_nodes": args.max_feature_nodes,
            "batch_size": args.batch_size,
            "cross_layer": tcs.cross_layer,
            "d_sae": tcs[0].cfg.d_sae,
        },
    )


if __name__ == "__main__":
    main()
