"""A trace at a 1B-class shape on a laptop's memory: random weights of Llama-3.2-1B's published shape (d_model
2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocabulary 128,256) and a random JumpReLU transcoder set in
circuit-tracer's layout (memory-mapped), a long prompt of random tokens.

    .venv/bin/python benchmarks/trace_1b.py [--tokens 256] [--d-sae 16384] [--batch-size 8] [--max-feature-nodes 128]

Prints the estimate trace makes, the peak resident memory of the process and its parts (model, the set's files),
and the time. Random weights make the graph meaningless; the memory and time are what a real set of that shape
costs, for the same number of active features (--l0 per token and layer).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_gib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return 0.0


class PeakAnon:
    """The peak of the process's anonymous memory (RssAnon), sampled: what must fit in RAM, unlike the set's
    mapped file pages, which RSS also counts but the OS can drop and read again."""

    def __init__(self) -> None:
        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_gib("RssAnon"))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, rss_gib("RssAnon"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--l0", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-feature-nodes", type=int, default=128)
    p.add_argument(
        "--set", type=Path, help="where the random set is written, or read when it exists (a 131k set is 32 GiB)"
    )
    args = p.parse_args()

    from _random_set import random_set
    from host_models import SHAPES
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nanosae.interp import circuits as C
    from nanosae.models import keep_freed_memory
    from nanosae.models.hf import HFModel, dequantized_dir, smollm2_gguf

    keep_freed_memory()  # as the nanosae command does
    torch.manual_seed(0)
    start = time.perf_counter()
    _, _, shape = SHAPES["llama-3.2-1b"]  # the published config's sizes, as host_models.py builds them
    cfg = LlamaConfig(**shape)
    module = LlamaForCausalLM(cfg).eval()
    tokenizer = AutoTokenizer.from_pretrained(dequantized_dir(smollm2_gguf()))  # only its BOS id is used
    model = HFModel(module, tokenizer, "random-llama-3.2-1b-shape")
    model_gib = sum(p.numel() * 4 for p in module.parameters()) / 2**30
    tokens = [tokenizer.bos_token_id, *torch.randint(100, 49152, (args.tokens - 1,)).tolist()]

    set_dir = args.set or Path(tempfile.mkdtemp(prefix="nanosae-1b-")) / "set"
    if not (set_dir / "config.yaml").exists():
        random_set(set_dir, model, tokens[:64], args.d_sae, args.l0, scan="random-1b", dec_std=0.01)
    set_gib = sum(f.stat().st_size for f in set_dir.glob("*.safetensors")) / 2**30
    _, tset = C.load_transcoders(set_dir)
    setup = time.perf_counter() - start
    before, anon_before = rss_gib(), rss_gib("RssAnon")
    anon = PeakAnon()
    estimate: list[int] = []
    start = time.perf_counter()
    graph = C.attribute(
        model,
        tset,
        tokens,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        memory_limit=C.available_memory(),
        on_estimate=estimate.append,
    )
    seconds = time.perf_counter() - start
    peak_anon = anon.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"{args.tokens} tokens, {graph.info['active_features']} active features, {graph.n_features} traced, "
        f"batch {args.batch_size}; model {model_gib:.1f} GiB (float32), set {set_gib:.1f} GiB on disk (mapped)"
    )
    print(
        f"setup {setup:.0f} s; RSS before the trace {before:.1f} GiB; trace estimate +{estimate[0] / 2**30:.2f} GiB; "
        f"peak RSS {peak:.1f} GiB (+{peak - before:.1f}); attribution {seconds:.0f} s"
    )
    print(
        f"anonymous memory (what must fit; RSS also counts the set's mapped pages): {anon_before:.1f} GiB before "
        f"the trace, peak {peak_anon:.1f} GiB (+{peak_anon - anon_before:.2f})"
    )


if __name__ == "__main__":
    main()
