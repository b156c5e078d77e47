"""What a model-diffing crosscoder costs against one SAE on the same tokens: BatchTopK, the same d_sae, k, batch
and token budget, read from stores (the pair from `nanosae collect --model A --model B`, e.g. the diff demo's).
The SAE reads A's store; the crosscoder reads both (twice the width in and out). Runs alternate, SAE then
crosscoder, and the ratio is of the medians. Goal: ≤ 2.2×.

Usage: python benchmarks/diff_cost.py A_STORE B_STORE [--tokens 120000] [--d-sae 2304] [--k 32] [--repeats 2]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import save


def main() -> None:
    from nanosae.config import TrainConfig
    from nanosae.train import train

    p = argparse.ArgumentParser()
    p.add_argument("stores", nargs=2)
    p.add_argument("--tokens", type=int, default=120_000)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="nanosae-diff-cost-"))
    seconds: dict[str, list[float]] = {"sae": [], "crosscoder": []}
    fvu: dict[str, float] = {}
    for r in range(args.repeats):
        for kind in seconds:
            source = {"acts": args.stores[0]} if kind == "sae" else {"crosscoder_acts": list(args.stores)}
            cfg = TrainConfig.build(
                out=str(root / f"{kind}{r}"),
                architecture="batchtopk",
                d_sae=args.d_sae,
                k=args.k,
                tokens=args.tokens,
                checkpoint_every=0,
                **source,
            )
            t0 = time.perf_counter()
            result = train(cfg)
            seconds[kind].append(time.perf_counter() - t0)
            fvu[kind] = round(float(result.metrics.get("fvu", float("nan"))), 4)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    ratio = median["crosscoder"] / median["sae"]
    for kind in seconds:
        print(f"{kind:>10}: {median[kind]:6.1f} s median of {len(seconds[kind])}, final FVU {fvu[kind]}")
    print(f"crosscoder / SAE: {ratio:.2f}x (goal <= 2.2x)")
    save(
        __file__,
        {"seconds": seconds, "median": median, "ratio": round(ratio, 3), "fvu": fvu, "tokens": args.tokens},
    )


if __name__ == "__main__":
    main()
