"""GPU figures in one script (about 70 s on an H200): SAE training, collection, streaming, memory.

1. SAE training tokens/s at d_in 2304, d_sae 65,536, k 64 and at the demo's 576 / 4608 / 32 (batch 4096): nanosae
   (float32, and with --encoder-bf16's bfloat16 encoder GEMM), sparsify (its Triton decoder when importable, in
   float32 and under bfloat16 autocast as its trainer runs), and the bound: the encoder GEMM alone at the rate
   measured here. Target: nanosae >= 1.5x sparsify's best.
2. Collection tokens/s from random-initialised Gemma-2-2B- and Llama-3.2-1B-shaped models (built from their
   configs in bfloat16, no download) against their bare truncated forward on the same windows. Target >= 0.9x.
3. Streaming training (d_sae 16,384, k 64) from the Llama-shaped model: tokens/s against the forward alone.
   Target: the SAE adds <= 15% to the forward.
4. Peak GPU memory of each part.
Prints a table per part and writes runs/benchmarks/gpu.json.
Usage: python benchmarks/gpu.py [--device cuda] [--smoke]
  --smoke: tiny shapes and models, seconds on a CPU (how the script is tested where there is no GPU).
"""

import argparse
import os
import time
from collections import Counter
from pathlib import Path

import torch
from _results import save
from train_throughput import Shape, nanosae_step

from nanosae.sae import kernels

TRAIN_SHAPES = [(2304, 65536, 64), (576, 4608, 32)]
MODELS = {
    "gemma-2-2b": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=4096,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rope_theta=500000.0,
        ),
    ),
}
SMOKE_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(step, tokens: int, device: str, reps: int) -> float:
    """Tokens/s of step(): two warm-up calls, then the median of reps timed calls."""
    step()
    step()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return tokens / sorted(times)[len(times) // 2]


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- 1. SAE training --------------------------------------------------------------------------------------
def sparsify_step(x: torch.Tensor, d_sae: int, k: int, autocast: bool):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = coder(x).fvu
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def training(device: str, shapes: list[tuple[int, int, int]], batch: int, reps: int) -> dict:
    if not device.startswith("cuda"):
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    out, steps_of = {}, {f"{d_in}x{d_sae} k{k}": {} for d_in, d_sae, k in shapes}
    for d_in, d_sae, k in shapes:
        x = torch.randn(batch, d_in, device=device)
        W = torch.randn(d_in, d_sae, device=device)
        rows = {"GEMM bound (float32)": rate(lambda: x @ W, batch, device, reps)}
        if device.startswith("cuda"):
            xb, Wb = x.bfloat16(), W.bfloat16()
            rows["GEMM bound (bfloat16)"] = rate(lambda: xb @ Wb, batch, device, reps)
        W = None  # freed before the trainers allocate theirs
        reset_peak(device)
        shape = Shape(d_in, d_sae, k, batch)
        trainers = [
            ("nanosae", lambda: nanosae_step(x, shape)),
            ("nanosae --encoder-bf16", lambda: nanosae_step(x, shape, encoder_bf16=True)),
            ("sparsify", lambda: sparsify_step(x, d_sae, k, False)),
            ("sparsify (bf16 autocast)", lambda: sparsify_step(x, d_sae, k, True)),
        ]
        other = "csr" if kernels.ROWS_SUM.get(x.device.type) == "embedding_bag" else "embedding_bag"
        trainers += [
            (
                f"nanosae --encoder-bf16, rows summed by {other}",  # the other way to sum selected rows
                lambda: with_rows_sum(other, nanosae_step(x, shape, encoder_bf16=True), x.device.type),
            )
        ]
        for name, make in trainers:
            try:
                reset_peak(device)
                step = make()
                rows[name] = rate(step, batch, device, reps)
                rows[name + " peak GiB"] = peak_gib(device)
                steps_of[f"{d_in}x{d_sae} k{k}"][name] = breakdown(step, device)
            except Exception as e:  # a peer that does not import or run here is reported, not fatal
                print(f"{name} not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        out[f"{d_in}x{d_sae} k{k}"] = rows
    return out, steps_of


def with_rows_sum(how: str, step, device_type: str):
    """step, run with kernels.ROWS_SUM set to `how` for its device."""

    def run():
        kept = kernels.ROWS_SUM.get(device_type)
        kernels.ROWS_SUM[device_type] = how
        try:
            step()
        finally:
            kernels.ROWS_SUM[device_type] = kept

    return run


def breakdown(step, device: str, top: int = 6, calls: int = 3) -> dict:
    """Where a step's time goes, so a shortfall names its part: the `top` kernels (operators on a CPU) by their
    own time, as shares of the step's total, and that total in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
        sync(device)

    def own(e) -> float:
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    events = prof.key_averages()
    total = sum(own(e) for e in events) or 1.0
    parts = {e.key[:70]: own(e) / total for e in sorted(events, key=own, reverse=True)[:top]}
    return {"ms_per_step": total / calls / 1000, "parts": parts}


# ---- 2. collection and 3. streaming ---------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the built-in corpus' most common words (no download; ids fit the model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from nanosae import DataConfig
    from nanosae.data import iter_documents

    words = Counter()
    for i, doc in enumerate(iter_documents(DataConfig(specs=["builtin:stdlib"]))):
        words.update(doc.split())
        if i > 2000:
            break
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    for w, _ in words.most_common(vocab_size - 3):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def host(name: str, device: str, smoke: bool):
    import transformers

    from nanosae.models.hf import HFModel

    cfg_name, model_name, shape = MODELS[name]
    vocab = 4096 if smoke else 32768
    cfg = getattr(transformers, cfg_name)(
        **(SMOKE_MODEL if smoke else shape), vocab_size=vocab, max_position_embeddings=2048
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16, on the device directly (no 2B-parameter CPU init)
    try:
        with torch.device(device):
            module = getattr(transformers, model_name)(cfg)
    finally:
        torch.set_default_dtype(default)
    return HFModel(module, word_tokenizer(vocab), name)


def collection(device: str, names: list[str], tokens: int, smoke: bool) -> dict:
    import tempfile

    from nanosae import CollectConfig, DataConfig
    from nanosae.data import collect, iter_documents, token_batches

    out = {}
    for name in names:
        model = host(name, device, smoke)
        hook = f"blocks.{model.n_layers // 2}.hook_resid_post"
        data = DataConfig(specs=["builtin:stdlib"], context_size=256 if not smoke else 32)  # millions of tokens
        batch = 16 if not smoke else 4
        windows = token_batches(iter_documents(data), model.tokenizer, data.context_size, batch)
        fixed = [next(windows) for _ in range(4)]
        n = sum(int(b.valid.sum()) for b in fixed)
        state = {"i": 0}

        def forward():
            b = fixed[state["i"] % len(fixed)]
            state["i"] += 1
            model.run_with_cache(b.tokens.to(device), [hook], return_logits=False)

        reset_peak(device)
        fwd = rate(forward, n // len(fixed), device, 8)
        with tempfile.TemporaryDirectory() as d:
            cfg = CollectConfig(
                model=name,
                hooks=[hook],
                data=data,
                tokens=tokens,
                out=d,
                batch_size=batch,
                device=device,
                model_dtype="bfloat16",
            )
            collect(cfg, model=model)  # warm-up (kernels, allocator)
        with tempfile.TemporaryDirectory() as d:
            sync(device)
            t = time.perf_counter()
            collect(CollectConfig(**{**vars(cfg), "out": d}), model=model)
            sync(device)
            col = tokens / (time.perf_counter() - t)
        out[name] = {
            "forward_tokens_per_s": fwd,
            "collect_tokens_per_s": col,
            "ratio": col / fwd,
            "writes_tokens_per_s": store_writes(cfg.tokens_per_shard, model.hook_dim(hook)),
            "peak_gib": peak_gib(device),
            "hook": hook,
        }
        model = None  # freed before the next model loads
    return out


def store_writes(rows: int, d_in: int, reps: int = 3) -> float:
    """Tokens/s the store's shard writes alone sustain here (float16 shards: np.save, SHA-256, atomic rename):
    the bound on collection when they, not the model, are the slower part."""
    import tempfile

    import numpy as np

    from nanosae.data.store import save_npy

    shard = np.random.default_rng(0).standard_normal((rows, d_in), dtype=np.float32).astype(np.float16)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        for i in range(reps):
            save_npy(Path(d) / f"shard_{i:05d}.npy", shard)
        return rows * reps / (time.perf_counter() - t)


def streaming(device: str, tokens: int, smoke: bool) -> dict:
    import tempfile

    import nanosae
    from nanosae import DataConfig, TrainConfig
    from nanosae.data import ActivationStream

    model = host("llama-3.2-1b", device, smoke)
    hook = f"blocks.{model.n_layers // 2}.hook_resid_post"
    data = DataConfig(specs=["builtin:stdlib"], context_size=256 if not smoke else 32)
    mbs = 16 if not smoke else 4
    d_sae, batch = (16384, 4096) if not smoke else (512, 256)

    logged: list[tuple[int, float]] = []  # (step, time) at each logged step: the steady rate, setup left out

    def at_log(p) -> None:
        sync(device)
        logged.append((p.step, time.perf_counter()))

    def run(train: bool) -> float:
        stream = ActivationStream(model, [hook], data, model_batch_size=mbs, buffer_tokens=4 * batch)
        sync(device)
        t = time.perf_counter()
        if train:
            with tempfile.TemporaryDirectory() as d:
                nanosae.train(
                    TrainConfig.build(
                        out=d,
                        hook=hook,
                        d_sae=d_sae,
                        k=64 if not smoke else 8,
                        tokens=tokens,
                        batch_size=batch,
                        device=device,
                        checkpoint_every=0,
                        log_every=8,
                    ),
                    source=stream,
                    progress=at_log,
                )
        else:
            n = 0
            for acts in stream.activations():
                n += len(acts)
                if n >= tokens:
                    break
        sync(device)
        return tokens / (time.perf_counter() - t)

    run(False)  # warm-up
    reset_peak(device)
    fwd, trained = run(False), run(True)
    (s0, t0), (s1, t1) = logged[0], logged[-1]
    steady = (s1 - s0) * batch / (t1 - t0) if s1 > s0 else float("nan")
    return {
        "forward_tokens_per_s": fwd,
        "train_tokens_per_s": trained,
        "sae_share": fwd / trained - 1,
        "steady_train_tokens_per_s": steady,
        "steady_sae_share": fwd / steady - 1,
        "peak_gib": peak_gib(device),
        "d_sae": d_sae,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    device, smoke = args.device, args.smoke
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"nanosae GPU benchmark on {name} ({time.strftime('%Y-%m-%d')}), torch {torch.__version__}\n")
    shapes = [(64, 512, 8)] if smoke else TRAIN_SHAPES
    train, steps_of = training(device, shapes, batch=256 if smoke else 4096, reps=3 if smoke else 10)
    print(
        f"| SAE training (batch {256 if smoke else 4096}, tokens/s) | "
        + " | ".join(train)
        + " |\n|---|"
        + "---|" * len(train)
    )
    for row in dict.fromkeys(r for v in train.values() for r in v):
        cells = [train[s].get(row) for s in train]
        fmt = (
            (lambda v: "-" if v is None else f"{v:.1f}")
            if "GiB" in row
            else (lambda v: "-" if v is None else f"{v:,.0f}")
        )
        print(f"| {row} | " + " | ".join(fmt(c) for c in cells) + " |")
    for shape, rows in train.items():
        peers = [v for k, v in rows.items() if k.startswith("sparsify") and "GiB" not in k]
        ours = max(v for k, v in rows.items() if k.startswith("nanosae") and "GiB" not in k)
        bound = max(v for k, v in rows.items() if k.startswith("GEMM bound"))
        print(f"{shape}: nanosae's best at {ours / bound:.0%} of the fastest encoder GEMM alone")
        if peers:
            print(f"{shape}: nanosae / sparsify's best {ours / max(peers):.2f}x (target >= 1.5x)")
    print("\nwhere a step's time goes (own time of the top kernels, share of the step):")
    for shape, trainers in steps_of.items():
        for name, b in trainers.items():
            parts = ", ".join(f"{k} {v:.0%}" for k, v in b["parts"].items())
            print(f"- {shape} {name} ({b['ms_per_step']:.2f} ms): {parts}")
    col = collection(device, list(MODELS), tokens=262144 if not smoke else 256, smoke=smoke)
    print(
        "\n| collection (bfloat16 model) | truncated forward tok/s | collect tok/s | ratio (target >= 0.9) "
        "| shard writes alone tok/s | peak GiB |"
    )
    print("|---|---|---|---|---|---|")
    for m, r in col.items():
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(
            f"| {m} | {r['forward_tokens_per_s']:,.0f} | {r['collect_tokens_per_s']:,.0f} | {r['ratio']:.2f} "
            f"| {r['writes_tokens_per_s']:,.0f} | {peak} |"
        )
    st = streaming(device, tokens=524288 if not smoke else 4096, smoke=smoke)
    print(
        f"\nstreaming training from llama-3.2-1b-shaped, d_sae {st['d_sae']}: forward alone "
        f"{st['forward_tokens_per_s']:,.0f} tok/s, with the SAE {st['train_tokens_per_s']:,.0f} tok/s: the SAE adds "
        f"{st['sae_share']:.0%} (target <= 15%); once started (setup left out) {st['steady_train_tokens_per_s']:,.0f} "
        f"tok/s, {st['steady_sae_share']:.0%}"
    )
    save(
        __file__,
        {
            "device": name,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "smoke": smoke,
            "training": train,
            "step_breakdown": steps_of,
            "collection": col,
            "streaming": st,
        },
    )


if __name__ == "__main__":
    main()
