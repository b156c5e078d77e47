"""A research-sized dictionary on the CPU: d_in 2304 (Gemma-2-2B's width), d_sae 65,536, k 64, batch 4096, trained
from a 2M-token float16 store (synthetic, 9 GB, written once into --store and reused).

Prints peak RSS of the training process against parameters + Adam state + one shuffle pool (target <= 1.2x; the
gradients, one more copy of the parameters, are the difference a plain Adam step cannot avoid), training
tokens/s, and how fast the store's shuffled reader delivers batches against how fast training consumes them
(target >= 3x). Tokens/s against sparsify on this shape: `train_throughput.py --shape 2304,65536,64`.
Usage: python benchmarks/research_scale.py [--store /tmp/nanosae-research-store] [--steps 6]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save

D_IN, D_SAE, K, BATCH, TOKENS = 2304, 65536, 64, 4096, 2_000_000


def make_store(path: Path) -> None:
    """2M tokens of low-rank-plus-noise activations, written block by block (never all in memory)."""
    import torch

    from nanosae.data import write_store

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(256, D_IN, generator=g)

    def blocks():
        for _ in range(TOKENS // 32768):
            yield (torch.randn(32768, 256, generator=g) @ basis) / 16 + torch.randn(32768, D_IN, generator=g) * 0.1

    write_store(path, blocks(), dtype="float16", hook="blocks.12.hook_resid_post", model="synthetic")


def child(store: Path, steps: int) -> dict:
    import torch

    import nanosae
    from nanosae import ActivationStore, TrainConfig

    torch.set_num_threads(2)
    acts = ActivationStore(store, verify=False)
    t = time.perf_counter()
    n = 0
    for _ in acts.batches(BATCH, shuffle=True, seed=1):
        n += 1
        if n == 2 * steps:
            break
    read_rate = n * BATCH / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as out:
        result = nanosae.train(
            TrainConfig.build(
                acts=str(store),
                out=out,
                d_sae=D_SAE,
                k=K,
                batch_size=BATCH,
                tokens=BATCH * steps,
                log_every=1,
                checkpoint_every=0,
                dead_tokens=TOKENS // 20,
            )
        )  # a 2M-token run's default
        lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in result.sae.parameters())
    pool_tokens = max(131072, 2**29 // (4 * D_IN))  # ActivationStore.batches' default
    pool = pool_tokens * D_IN * 2  # float16, as the store holds it
    train_rate = lines[-1]["tokens_per_s"]  # training steps only (the store read and the final save excluded)
    return {
        "peak_rss_gib": peak / 2**30,
        "params_gib": params / 2**30,
        "adam_gib": 2 * params / 2**30,
        "pool_gib": pool / 2**30,
        "train_tokens_per_s": train_rate,
        "read_tokens_per_s": read_rate,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="/tmp/nanosae-research-store")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    store = Path(args.store)
    if args.child:
        print(json.dumps(child(store, args.steps)))
        return
    if not (store / "manifest.json").exists():
        t = time.perf_counter()
        make_store(store)
        print(f"wrote the 2M-token store in {time.perf_counter() - t:.0f} s")
    out = subprocess.run(
        [sys.executable, __file__, "--store", str(store), "--steps", str(args.steps), "--child"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    floor = r["params_gib"] + r["adam_gib"] + r["pool_gib"]
    print(
        f"TopK d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, {args.steps} steps from a 2M-token float16 store, "
        f"2 threads\n"
    )
    print(
        "| parameters | Adam state | shuffle pool | sum | peak RSS | RSS / sum (target <= 1.2) "
        "| RSS / (sum + gradients) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['params_gib']:.2f} GiB | {r['adam_gib']:.2f} GiB | {r['pool_gib']:.2f} GiB | {floor:.2f} GiB | "
        f"{r['peak_rss_gib']:.2f} GiB | {r['peak_rss_gib'] / floor:.2f} | "
        f"{r['peak_rss_gib'] / (floor + r['params_gib']):.2f} |"
    )
    print(
        f"\ntraining {r['train_tokens_per_s']:,.0f} tokens/s; the shuffled store reader {r['read_tokens_per_s']:,.0f} "
        f"tokens/s: {r['read_tokens_per_s'] / r['train_tokens_per_s']:.1f}x what training consumes (target >= 3x)"
    )
    save(__file__, r | {"steps": args.steps})


if __name__ == "__main__":
    main()
