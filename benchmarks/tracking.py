"""Overhead of live feature tracking during generation (SmolLM2-135M, CPU, KV-cached greedy decoding).

Generates the same tokens with and without a FeatureTracker (one TopK SAE, d_sae 4608, at
blocks.15.hook_resid_post), alternating, best of --reps each; prints tokens/s and the overhead
(target <= 5%).
Usage: python benchmarks/tracking.py [--tokens 48] [--reps 3]
"""

import argparse
import time

import torch
from _results import save

import nanosae
from nanosae import SAE, SAEConfig
from nanosae.interp.live import FeatureTracker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model = nanosae.load_model("smollm2-135m")
    sae = SAE(SAEConfig(d_in=576, d_sae=4608, architecture="topk", k=32, hook_name="blocks.15.hook_resid_post"))
    prompt = "def fibonacci(n):\n    "
    kwargs = dict(max_new_tokens=args.tokens, stop_at_eos=False)
    plain, tracked = float("inf"), float("inf")
    model.generate(prompt, **kwargs)  # warm-up
    for _ in range(args.reps):
        t = time.perf_counter()
        a = model.generate(prompt, **kwargs)
        plain = min(plain, time.perf_counter() - t)
        tracker = FeatureTracker(model, {"sae": sae}, top_k=5)
        t = time.perf_counter()
        b = tracker.generate(prompt, **kwargs)
        tracked = min(tracked, time.perf_counter() - t)
        assert a.tokens == b.tokens
    print(f"SmolLM2-135M, {args.tokens} tokens, KV cache, {torch.get_num_threads()} threads, best of {args.reps}")
    print(
        f"| generation | tokens/s |\n|---|---|\n| plain | {args.tokens / plain:.1f} |\n"
        f"| with tracking | {args.tokens / tracked:.1f} |"
    )
    print(f"tracking overhead: {(tracked / plain - 1) * 100:.1f}% (target <= 5%)")
    save(__file__, {"plain_tokens_per_s": args.tokens / plain, "tracked_tokens_per_s": args.tokens / tracked})


if __name__ == "__main__":
    main()
