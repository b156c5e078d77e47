"""N SAEs from one stream vs N separate runs (SmolLM2, streaming straight from the model, CPU).

Three TopK SAEs at blocks.5/10/15.hook_resid_post: trained together (one forward pass per batch captures
all three hooks) and then one after another (each run streams the model itself). Prints wall time of
both and the ratio; the shared run's cost is one (truncated) forward pass plus three SAE steps.
Usage: python benchmarks/many_saes.py [--tokens 16384]
"""

import argparse
import tempfile
import time

from _results import save

import nanosae
from nanosae import DataConfig, TrainConfig

HOOKS = ["blocks.5.hook_resid_post", "blocks.10.hook_resid_post", "blocks.15.hook_resid_post"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    data = DataConfig(specs=["builtin:pydocs", "builtin:stdlib"], context_size=256)
    base = dict(
        data=data,
        d_sae=2304,
        k=32,
        batch_size=2048,
        tokens=args.tokens,
        checkpoint_every=0,
        log_every=1000,
        init_sample_tokens=2048,
    )
    nanosae.load_model("smollm2-135m")  # warm the cache so both timings load the same way
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        nanosae.train([TrainConfig.build(out=f"{out}/together/{i}", hook=h, **base) for i, h in enumerate(HOOKS)])
        together = time.perf_counter() - t
        t = time.perf_counter()
        for i, h in enumerate(HOOKS):
            nanosae.train(TrainConfig.build(out=f"{out}/alone/{i}", hook=h, **base))
        separate = time.perf_counter() - t
    print(f"{len(HOOKS)} TopK SAEs (d_sae 2304, k 32) on SmolLM2, {args.tokens:,} streamed tokens each")
    print(
        f"| runs | wall time |\n|---|---|\n| one stream, all together | {together:.0f} s |\n"
        f"| separate runs | {separate:.0f} s |"
    )
    print(f"separate / together: {separate / together:.2f}x")
    save(__file__, {"together_s": together, "separate_s": separate, "tokens": args.tokens})


if __name__ == "__main__":
    main()
