"""How close trace's memory estimate is to what a trace really adds, over prompt lengths and batch sizes.

    .venv/bin/python benchmarks/trace_memory.py [--lengths 10,60,200] [--batches 8,32]

Each case runs in a fresh process on the embedded SmolLM2-135M with the random JumpReLU set of
benchmarks/circuit_tracer.py (30 × 4,096 features, about 8 active per token): the resident memory just before
attribution (with the model's and the set's memory-mapped files already read, so their pages do not count as the
trace's), the
process's peak after it, and the estimate attribute() printed in between; with the allocator setting the nanosae
command makes (keep_freed_memory) and with glibc's default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TEXT = (
    "The river rose in the spring, and the town moved its market up the hill, where the old church stood. "
    "Merchants came from the coast with salt and cloth, and stayed for the summer fair. "
) * 8


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one(set_dir: str, length: int, batch: int, nodes: int, tuned: bool) -> dict:
    from nanosae.interp import circuits as C
    from nanosae.models import keep_freed_memory, load_model

    if tuned:
        keep_freed_memory()  # as the nanosae command does
    model = load_model("smollm2-135m")
    _, tset = C.load_transcoders(set_dir)
    tokens = model.prompt_ids(TEXT)[:length]
    # the model's and the set's memory-mapped weights read first: the estimate is what the trace adds beyond them
    for module in (model.module, *tset.by_layer.values()):
        for t in (*module.parameters(), *module.buffers()):
            t.sum()
    estimate: list[int] = []
    before = rss()
    C.attribute(model, tset, tokens, max_feature_nodes=nodes, batch_size=batch, on_estimate=estimate.append)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"estimate": estimate[0], "added": peak - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="10,60,200")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--max-feature-nodes", type=int, default=256)
    p.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        set_dir, length, batch, tuned = args.case
        print(json.dumps(one(set_dir, int(length), int(batch), args.max_feature_nodes, tuned == "1")))
        return
    from _random_set import smollm2_set  # here: a case runs with -P, which leaves this folder off the path

    set_dir = Path(tempfile.mkdtemp(prefix="nanosae-mem-")) / "set"
    smollm2_set(set_dir, 4096, 8.0)
    print(f"{'allocator':>9} {'tokens':>6} {'batch':>5} {'estimate MiB':>12} {'added MiB':>10} {'ratio':>6}")
    lengths, batches = [int(n) for n in args.lengths.split(",")], [int(b) for b in args.batches.split(",")]
    for tuned, length, batch in ((t, n, b) for t in ("1", "0") for n in lengths for b in batches):
        cmd = [sys.executable, "-P", __file__, "--case", str(set_dir), str(length), str(batch), tuned]
        cmd += ["--max-feature-nodes", str(args.max_feature_nodes)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        allocator = "nanosae" if tuned == "1" else "default"
        print(
            f"{allocator:>9} {length:>6} {batch:>5} {r['estimate'] / 2**20:>12.0f} {r['added'] / 2**20:>10.0f} "
            f"{r['added'] / r['estimate']:>6.2f}"
        )


if __name__ == "__main__":
    main()
