"""Forward throughput of the embedded SmolLM2 on CPU: full pass vs the pass truncated after layer 15, with
glibc's default allocator settings and with nanosae's (`nanosae.models.keep_freed_memory()`, which the CLI sets).

Each setting runs in its own process, alternating, `--rounds` times each; prints tokens/s (best of the
processes) and the ratios: truncated/full (≈2× expected: 16 of 30 blocks, no lm_head) and kept/default.
Usage: python benchmarks/forward.py [--batch 8] [--seq 256] [--reps 3] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _results import save


def tokens_per_s(fn, n_tokens: int, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_tokens / best


def child(args: argparse.Namespace) -> None:
    import torch

    import nanosae
    from nanosae.models import keep_freed_memory

    keep_freed_memory()  # as the CLI does; NANOSAE_MALLOC_TUNING=0 in the environment turns it off
    model = nanosae.load_model("smollm2-135m")
    tokens = torch.randint(100, 40000, (args.batch, args.seq))
    n, hook = tokens.numel(), "blocks.15.hook_resid_post"
    full = tokens_per_s(lambda: model.run_with_cache(tokens, [hook]), n, args.reps)
    truncated = tokens_per_s(lambda: model.run_with_cache(tokens, [hook], return_logits=False), n, args.reps)
    print(json.dumps({"full": full, "truncated": truncated, "threads": torch.get_num_threads()}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for setting, env in (("default", "0"), ("kept", "1")):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--reps",
                    str(args.reps),
                ],
                env=os.environ | {"NANOSAE_MALLOC_TUNING": env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            got = json.loads(out.strip().splitlines()[-1])
            best[setting] = {k: max(v, best.get(setting, {}).get(k, 0.0)) for k, v in got.items()}
    d, k = best["default"], best["kept"]
    print(
        f"SmolLM2-135M forward, batch {args.batch} x {args.seq}, {int(k['threads'])} threads "
        f"(best of {args.reps} passes x {args.rounds} processes per setting)"
    )
    print("| pass | glibc default, tokens/s | freed memory kept, tokens/s | kept/default |\n|---|---|---|---|")
    for name, key in (("full (30 layers + lm_head)", "full"), ("truncated after layer 15", "truncated")):
        print(f"| {name} | {d[key]:,.0f} | {k[key]:,.0f} | {k[key] / d[key]:.2f}x |")
    print(f"ratio truncated/full (kept): {k['truncated'] / k['full']:.2f}x")
    save(__file__, {"default": d, "kept": k})


if __name__ == "__main__":
    main()
