"""Collection overhead and memory on the embedded SmolLM2 at blocks.15.hook_resid_post (CPU).

1. Throughput: collect() tokens/s divided by the bare truncated forward's tokens/s on the same token
   batches (target >= 0.90: tokenization and disk writes hide behind the forward in background threads).
2. Memory: peak RSS of a 50k-token and a 250k-token collection, each in its own process
   (target: the larger <= 1.10x the smaller: memory does not grow with the token count).
Usage: python benchmarks/collect.py [--tokens 30000] [--skip-rss]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

from _results import save

HOOK = "blocks.15.hook_resid_post"
DATA = ["builtin:pydocs", "builtin:stdlib"]

RSS_CHILD = r"""
import json, resource, sys, nanosae
from nanosae import CollectConfig, DataConfig
from nanosae.models import keep_freed_memory
keep_freed_memory()  # as the CLI does; NANOSAE_MALLOC_TUNING=0 turns it off
cfg = CollectConfig(hooks=[sys.argv[1]], data=DataConfig(specs=sys.argv[4:]), tokens=int(sys.argv[2]), out=sys.argv[3])
t = __import__("time").perf_counter()
nanosae.collect(cfg)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": __import__("time").perf_counter() - t}))
"""


def throughput(n_tokens: int) -> None:
    import nanosae
    from nanosae import CollectConfig, DataConfig
    from nanosae.data import iter_documents, token_batches

    model = nanosae.load_model("smollm2-135m")
    data = DataConfig(specs=DATA)
    batches, valid = [], 0
    for b in token_batches(iter_documents(data), model.tokenizer, data.context_size, 8):
        batches.append(b)
        valid += int(b.valid.sum())
        if valid >= n_tokens:
            break
    model.run_with_cache(batches[0].tokens, [HOOK], return_logits=False)  # warm-up
    t = time.perf_counter()
    for b in batches:
        model.run_with_cache(b.tokens, [HOOK], return_logits=False)
    bare = valid / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        nanosae.collect(CollectConfig(hooks=[HOOK], data=data, tokens=valid, out=out), model=model)
        full = valid / (time.perf_counter() - t)
    print(f"| bare truncated forward | {bare:,.0f} tokens/s |")
    print(f"| collect (tokenize + forward + write fp16 shards) | {full:,.0f} tokens/s |")
    print(f"collect / bare forward: {full / bare:.3f} (target >= 0.90)")
    return {"bare_forward_tokens_per_s": bare, "collect_tokens_per_s": full, "ratio": full / bare}


def rss(tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, HOOK, str(tokens), out, *DATA], capture_output=True, text=True, check=True
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--skip-rss", action="store_true")
    args = p.parse_args()
    print(f"SmolLM2-135M, {HOOK}, batch 8 x 256, data {' + '.join(DATA)}")
    figures = throughput(args.tokens)
    if not args.skip_rss:
        small, large = rss(50_000), rss(250_000)
        print(f"| peak RSS 50k tokens | {small['maxrss_mb']:,.0f} MB ({small['seconds']:.0f} s) |")
        print(f"| peak RSS 250k tokens | {large['maxrss_mb']:,.0f} MB ({large['seconds']:.0f} s) |")
        print(f"RSS ratio 250k/50k: {large['maxrss_mb'] / small['maxrss_mb']:.3f} (target <= 1.10)")
        figures |= {"rss_50k": small, "rss_250k": large}
    save(__file__, figures)


if __name__ == "__main__":
    main()
