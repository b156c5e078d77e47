"""Forward throughput of the embedded SmolLM2 on CPU: full pass vs the pass truncated after layer 15.

Prints tokens/s of each and their ratio (≈2× expected: 16 of 30 blocks, no lm_head).
Usage: python benchmarks/forward.py [--batch 8] [--seq 256] [--reps 3]
"""

import argparse
import time

import torch

import nanosae


def tokens_per_s(fn, n_tokens: int, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_tokens / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model = nanosae.load_model("smollm2-135m")
    tokens = torch.randint(100, 40000, (args.batch, args.seq))
    n = tokens.numel()
    hook = "blocks.15.hook_resid_post"
    full = tokens_per_s(lambda: model.run_with_cache(tokens, [hook]), n, args.reps)
    truncated = tokens_per_s(lambda: model.run_with_cache(tokens, [hook], return_logits=False), n, args.reps)
    print(f"SmolLM2-135M forward, batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads (best of {args.reps})")
    print(f"| pass | tokens/s |\n|---|---|\n| full (30 layers + lm_head) | {full:,.0f} |")
    print(f"| truncated after layer 15 | {truncated:,.0f} |")
    print(f"ratio truncated/full: {truncated / full:.2f}x")


if __name__ == "__main__":
    main()
