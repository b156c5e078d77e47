"""Training throughput of one TopK SAE step on CPU (synthetic activations).

d_in 576, d_sae 4608, k 32, batch 4096, fp32, torch.set_num_threads(2) (--shape D_IN,D_SAE,K and --batch
for others, e.g. the research-scale 2304,65536,64). Prints steady-state tokens/s of
  nanosae        (sparse kernels: one dense GEMM for the encoder, the rest on the k selected latents)
  nanosae / sparsify with half the latents dead (--dead 0.5): AuxK on every step, k_aux = d_in / 2
  dense PyTorch  (the textbook TopK step: dense encode, scatter, dense decode, autograd)
  SAELens / sparsify / dictionary_learning, when importable in this venv (never project dependencies)
and the bound: the time of the one unavoidable dense GEMM (batch x d_in x d_sae) at the GEMM rate
measured in this run. Targets: >= 2x the fastest peer, >= 60% of the bound; with half the latents dead a
step costs <= 1.3x a step with none, and >= 2x sparsify's in the same condition.
Steps are timed interleaved (one of each in turn) and the median is taken, so drifting machine speed
does not favour whoever ran first.
Usage: python benchmarks/train_throughput.py [--steps 11] [--dead 0.5] [--shape 576,4608,32] [--batch 4096]
"""

import argparse
import os
import resource
import time
from dataclasses import dataclass

import torch
from _results import save

from nanosae import SAE, SAEConfig, TrainConfig
from nanosae.train.losses import normalize_decoder, remove_parallel_grad, sae_loss
from nanosae.train.trainer import make_adam


@dataclass
class Shape:
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32
    batch: int = 4096


def interleaved(steps: dict, reps: int, batch: int) -> dict:
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
    return {name: batch / sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def dead_mask(s: Shape, fraction: float) -> torch.Tensor | None:
    """A fixed set of dead latents (the first `fraction` of a random order), or None."""
    if not fraction:
        return None
    mask = torch.zeros(s.d_sae, dtype=torch.bool)
    mask[torch.randperm(s.d_sae, generator=torch.Generator().manual_seed(1))[: int(fraction * s.d_sae)]] = True
    return mask


def nanosae_step(x: torch.Tensor, s: Shape, dead: torch.Tensor | None = None, encoder_bf16: bool = False):
    """One nanosae training step as the trainer takes it, on x's device (also used by gpu.py)."""
    sae = SAE(SAEConfig(d_in=s.d_in, d_sae=s.d_sae, architecture="topk", k=s.k, device=str(x.device)))
    opt = make_adam(sae, 1e-4, TrainConfig())

    def step():
        out = sae_loss(sae, x, dead_mask=dead, encoder_bf16=encoder_bf16)  # k_aux = d_in / 2, as sparsify
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


def dense_step(x: torch.Tensor, s: Shape):
    W_enc = torch.nn.Parameter(torch.randn(s.d_in, s.d_sae) / s.d_in**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(s.d_sae))
    W_dec = torch.nn.Parameter(torch.randn(s.d_sae, s.d_in) / s.d_in**0.5)
    b_dec = torch.nn.Parameter(torch.zeros(s.d_in))

    def loss():
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(s.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return (z @ W_dec + b_dec - x).pow(2).sum(-1).mean()

    return adam_step([W_enc, b_enc, W_dec, b_dec], loss)


def peers(x: torch.Tensor, s: Shape, dead: torch.Tensor | None, all_peers: bool) -> dict:
    """Peers' own TopK training step where the package is installed; skipped otherwise."""
    out = {}
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own switch: its Triton decoder is GPU-only
    try:
        from sparsify import SparseCoder, SparseCoderConfig

        coder = SparseCoder(s.d_in, SparseCoderConfig(num_latents=s.d_sae, k=s.k))
        out["sparsify"] = adam_step(coder.parameters(), lambda: coder(x).fvu)
        if dead is not None:  # its trainer's loss: fvu + auxk_alpha (1/32) * auxk_loss
            coder_dead = SparseCoder(s.d_in, SparseCoderConfig(num_latents=s.d_sae, k=s.k))
            out["sparsify, half dead"] = adam_step(
                coder_dead.parameters(), lambda: (lambda o: o.fvu + o.auxk_loss / 32)(coder_dead(x, dead_mask=dead))
            )
    except Exception as e:
        print(f"sparsify not measured: {e}")
    if not all_peers:
        return out
    try:
        from dictionary_learning.trainers.top_k import AutoEncoderTopK

        ae = AutoEncoderTopK(s.d_in, s.d_sae, s.k)
        out["dictionary_learning"] = adam_step(ae.parameters(), lambda: (ae(x) - x).pow(2).sum(-1).mean())
    except Exception as e:
        print(f"dictionary_learning not measured: {e}")
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=s.d_in, d_sae=s.d_sae, k=s.k))  # its defaults, as a user would
        step_input = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        out["SAELens"] = adam_step(sae.parameters(), lambda: sae.training_forward_pass(step_input).loss)
    except Exception as e:
        print(f"SAELens not measured: {e}")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--dead", type=float, default=0.5, help="share of latents dead in the AuxK cases (0: skip them)")
    p.add_argument("--shape", default="576,4608,32", help="d_in,d_sae,k")
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    s = Shape(*map(int, args.shape.split(",")), batch=args.batch)
    demo_shape = s == Shape()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(s.batch, s.d_in)
    W = torch.randn(s.d_in, s.d_sae)
    flops = 2 * s.batch * s.d_in * s.d_sae
    dead = dead_mask(s, args.dead)
    steps = {"GEMM": lambda: x @ W, "nanosae": nanosae_step(x, s)}
    if dead is not None:
        steps["nanosae, half dead" if args.dead == 0.5 else f"nanosae, {args.dead:.0%} dead"] = nanosae_step(x, s, dead)
    if demo_shape:  # the dense reference needs a (batch, d_sae) buffer four times over: the small shape only
        steps["dense PyTorch TopK"] = dense_step(x, s)
    steps |= peers(x, s, dead, all_peers=demo_shape)
    rates = interleaved(steps, args.steps, s.batch)
    gemm = rates.pop("GEMM")  # tokens/s if a step were only the encoder GEMM
    print(f"TopK SAE training step, d_in {s.d_in}, d_sae {s.d_sae}, k {s.k}, batch {s.batch}, fp32, 2 threads")
    print(f"GEMM rate {flops * gemm / s.batch / 1e9:.1f} GFLOP/s -> bound {gemm:,.0f} tokens/s\n")
    base = rates.get("dense PyTorch TopK", rates["nanosae"])
    print(f"| trainer | tokens/s | vs {'dense' if demo_shape else 'nanosae'} | of bound |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / gemm:.0%} |")
    live = {n: r for n, r in rates.items() if "dead" not in n}
    fastest_peer = max((r for n, r in live.items() if n != "nanosae"), default=None)
    if fastest_peer:
        print(
            f"\nnanosae / fastest other: {rates['nanosae'] / fastest_peer:.2f}x (target >= 2x); "
            f"of bound: {rates['nanosae'] / gemm:.0%} (target >= 60%)"
        )
    dead_name = next((n for n in rates if n.startswith("nanosae,")), None)
    if dead_name:
        print(f"{dead_name}: a step costs {rates['nanosae'] / rates[dead_name]:.2f}x a step with none (target <= 1.3x)")
        if "sparsify, half dead" in rates:
            print(
                f"{dead_name} / sparsify, half dead: {rates[dead_name] / rates['sparsify, half dead']:.2f}x "
                f"(target >= 2x)"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.2f} GiB")
    save(__file__, {"shape": vars(s), "tokens_per_s": rates, "gemm_bound_tokens_per_s": gemm, "peak_rss_gib": peak})


if __name__ == "__main__":
    main()
