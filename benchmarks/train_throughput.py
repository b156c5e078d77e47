"""Training throughput of one TopK SAE step on CPU (synthetic activations).

d_in 576, d_sae 4608, k 32, batch 4096, fp32, torch.set_num_threads(2). Prints steady-state tokens/s of
  nanosae        (sparse kernels: one dense GEMM for the encoder, the rest on the k selected latents)
  dense PyTorch  (the textbook TopK step: dense encode, scatter, dense decode, autograd)
  SAELens / sparsify / dictionary_learning, when importable in this venv (never project dependencies)
and the bound: the time of the one unavoidable dense GEMM (batch x d_in x d_sae) at the GEMM rate
measured in this run. Targets: >= 2x the fastest peer, >= 60% of the bound.
Steps are timed interleaved (one of each in turn) and the median is taken, so drifting machine speed
does not favour whoever ran first.
Usage: python benchmarks/train_throughput.py [--steps 11]
"""

import argparse
import os
import time

import torch

from nanosae import SAE, SAEConfig, TrainConfig
from nanosae.train.losses import normalize_decoder, remove_parallel_grad, sae_loss
from nanosae.train.trainer import make_adam

from _results import save

D_IN, D_SAE, K, BATCH = 576, 4608, 32, 4096


def interleaved(steps: dict, reps: int) -> dict:
    """tokens/s of each step function: one step of each in turn, repeated, median per function.

    Interleaving keeps the ratios fair on a machine whose speed drifts (shared, noisy CPUs)."""
    for step in steps.values():
        step()
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: BATCH / sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def nanosae_step(x: torch.Tensor):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K))
    opt = make_adam(sae, 1e-4, TrainConfig())

    def step():
        out = sae_loss(sae, x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        remove_parallel_grad(sae)
        opt.step()
        normalize_decoder(sae)
    return step


def adam_step(params, loss_fn):
    """A plain Adam step (lr 1e-4) on loss_fn(): how the dense reference and every peer are timed."""
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def dense_step(x: torch.Tensor):
    W_enc = torch.nn.Parameter(torch.randn(D_IN, D_SAE) / D_IN**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
    W_dec = torch.nn.Parameter(torch.randn(D_SAE, D_IN) / D_IN**0.5)
    b_dec = torch.nn.Parameter(torch.zeros(D_IN))

    def loss():
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(K, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return (z @ W_dec + b_dec - x).pow(2).sum(-1).mean()
    return adam_step([W_enc, b_enc, W_dec, b_dec], loss)


def peers(x: torch.Tensor) -> dict:
    """Peers' own TopK training step where the package is installed; skipped otherwise."""
    out = {}
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own switch: its Triton decoder is GPU-only
    try:
        from sparsify import SparseCoder, SparseCoderConfig

        coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
        out["sparsify"] = adam_step(coder.parameters(), lambda: coder(x).fvu)
    except Exception as e:
        print(f"sparsify not measured: {e}")
    try:
        from dictionary_learning.trainers.top_k import AutoEncoderTopK

        ae = AutoEncoderTopK(D_IN, D_SAE, K)
        out["dictionary_learning"] = adam_step(ae.parameters(), lambda: (ae(x) - x).pow(2).sum(-1).mean())
    except Exception as e:
        print(f"dictionary_learning not measured: {e}")
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))  # its defaults, as a user would
        step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                    is_logging_step=False)
        out["SAELens"] = adam_step(sae.parameters(), lambda: sae.training_forward_pass(step_input).loss)
    except Exception as e:
        print(f"SAELens not measured: {e}")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(BATCH, D_IN)
    W = torch.randn(D_IN, D_SAE)
    flops = 2 * BATCH * D_IN * D_SAE
    steps = {"GEMM": lambda: x @ W, "nanosae": nanosae_step(x), "dense PyTorch TopK": dense_step(x)} | peers(x)
    rates = interleaved(steps, args.steps)
    gemm = rates.pop("GEMM")  # tokens/s if a step were only the encoder GEMM
    print(f"TopK SAE training step, d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, fp32, 2 threads")
    print(f"GEMM rate {flops * gemm / BATCH / 1e9:.1f} GFLOP/s -> bound {gemm:,.0f} tokens/s\n")
    print("| trainer | tokens/s | vs dense | of bound |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / rates['dense PyTorch TopK']:.2f}x | {rate / gemm:.0%} |")
    fastest_peer = max((r for n, r in rates.items() if n != "nanosae"), default=None)
    print(f"\nnanosae / fastest other: {rates['nanosae'] / fastest_peer:.2f}x (target >= 2x); "
          f"of bound: {rates['nanosae'] / gemm:.0%} (target >= 60%)")
    save(__file__, {"tokens_per_s": rates, "gemm_bound_tokens_per_s": gemm})


if __name__ == "__main__":
    main()
