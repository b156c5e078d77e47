"""Which architecture finds the true features? nanosae's on the synthetic ground truth (eval/synthetic.py).

Every trainer gets exactly the same samples (the synthetic model's stream, one seed) and the same L0 target;
each SAE is scored on fresh samples: MCC, feature F1, uniqueness, variance explained, L0, dead latents and, for
the hierarchies, absorption. With --peers (run in the peers' venv, make bench), SAELens's trainers of the same
architectures (TopK, BatchTopK, Matryoshka BatchTopK with nanosae's group widths, JumpReLU) train on the same
samples in the same order at the same k (JumpReLU: both with Gemma Scope 2's quadratic penalty around L0 = k),
with SynthSAEBench's settings (batch 1024, lr 3e-4, constant), and are scored alike.
--variant JSON trains nanosae's with those TrainConfig settings instead of the defaults (e.g. '{"k_anneal": 0.8}').
Usage: python benchmarks/synthetic.py [--preset cpu] [--samples 10M] [--d-sae 4096] [--k 25] [--peers]
       [--variant JSON]
"""

import argparse
import json
import tempfile
import time

from _results import save

import nanosae
from nanosae.eval.synthetic import PRESETS, SyntheticModel, at_l0, synthetic_scores
from nanosae.options import parse_count

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu")
SAELENS = {"topk": "topk", "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk", "jumprelu": "jumprelu"}


class SAELensScored:
    """A SAELens SAE seen as synthetic_scores reads one: W_dec, and (x_hat, z) from a call."""

    def __init__(self, sae):
        self.sae, self.W_dec = sae, sae.W_dec
        self.device, self.dtype = sae.W_dec.device, sae.W_dec.dtype

    def __call__(self, x):
        z = self.sae.encode(x)
        return self.sae.decode(z), z


def train_saelens(arch: str, d_in: int, batches, samples: int, d_sae: int, k: int, widths: list[int]):
    """SAELens's trainer of this architecture on `batches` of 1,024 (the stream nanosae's trainers read: seed 0,
    same order)."""
    import torch
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    sae_class, cfg_class = get_sae_training_class(SAELENS[arch])
    if arch == "jumprelu":  # its own target-L0 loss (Gemma Scope 2's quadratic penalty), as nanosae's runs
        extra = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(k)}
    else:
        extra = {"k": k} | ({"matryoshka_widths": list(widths)} if arch == "matryoshka" else {})
    torch.manual_seed(0)
    sae = sae_class(cfg_class(d_in=d_in, d_sae=d_sae, **extra))
    trainer_cfg = SAETrainerConfig(  # train_toy_sae's settings (SynthSAEBench's runner defaults)
        total_training_samples=samples,
        train_batch_size_samples=1024,
        lr=3e-4,
        lr_end=3e-4,
        device="cpu",
        dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches).fit()
    return SAELensScored(sae.eval())


def trainer_args(p: argparse.ArgumentParser) -> None:
    """The options both synthetic benchmarks take: which trainers run, and nanosae's settings."""
    p.add_argument("--architecture", action="append", default=None, choices=ARCHITECTURES)
    p.add_argument("--peers", action="store_true", help="SAELens's trainers too (the peers' venv)")
    p.add_argument("--peers-only", action="store_true", help="SAELens's trainers alone (nanosae's rows measured)")
    p.add_argument("--variant", type=json.loads, default={}, help="nanosae TrainConfig settings as JSON")


def compare(args, source, samples: int, d_sae: int, k: int, architectures, score, report) -> dict:
    """nanosae's trainers (unless --peers-only) and SAELens's (with --peers) on the same stream from `source`, each
    scored as it finishes (`score(sae, peer)`) and reported with its training seconds; the figures by name."""
    figures: dict = {}
    for arch in args.architecture or architectures:
        extra = at_l0(arch, k)  # equal L0 for every trainer
        if not args.peers_only:
            with tempfile.TemporaryDirectory() as tmp:
                settings = extra | args.variant
                cfg = nanosae.TrainConfig.build(out=tmp, architecture=arch, d_sae=d_sae, tokens=samples, **settings)
                t0 = time.perf_counter()
                sae = nanosae.train(cfg, source=source).sae
                seconds = time.perf_counter() - t0
            name = f"nanosae {arch}" + (f" {json.dumps(args.variant)}" if args.variant else "")
            report(name, score(sae, False), seconds, figures)
        if (args.peers or args.peers_only) and arch in SAELENS:
            groups = nanosae.SAEConfig(d_in=source.d_in, d_sae=d_sae, architecture=arch, **extra).matryoshka_groups
            t0 = time.perf_counter()
            batches = source.batches(1024, seed=0)
            peer = train_saelens(arch, source.d_in, batches, samples, d_sae, k, groups or [d_sae])
            seconds = time.perf_counter() - t0
            report(f"SAELens {arch}", score(peer, True), seconds, figures)
    return figures


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--samples", default="10M")
    p.add_argument("--d-sae", type=int, default=None, help="default: the preset's number of true features")
    p.add_argument("--k", type=int, default=None, help="default: the preset's mean L0")
    trainer_args(p)
    args = p.parse_args()
    model = SyntheticModel(PRESETS[args.preset])
    samples = parse_count(args.samples)
    d_sae = args.d_sae or model.cfg.n_features
    k = args.k or round(model.cfg.mean_l0)
    print(
        f"{args.preset}: {model.cfg.n_features} true features in {model.cfg.d} dims, mean L0 "
        f"{model.cfg.mean_l0}; d_sae {d_sae}, k {k}, {samples:,} samples"
    )
    print(f"{'':20} {'MCC':>6} {'F1':>6} {'unique':>7} {'VE':>6} {'L0':>6} {'dead':>6} {'absorb':>7} {'s':>6}")
    figures = compare(
        args, model, samples, d_sae, k, ARCHITECTURES, lambda sae, peer: synthetic_scores(sae, model), report
    )
    save(
        __file__,
        {"preset": args.preset, "samples": samples, "d_sae": d_sae, "k": k, "results": figures}
        | ({"variant": args.variant} if args.variant else {}),
    )


def report(name: str, scores: dict, seconds: float, figures: dict) -> None:
    s = figures[name] = scores | {"seconds": round(seconds, 1)}
    print(
        f"{name:20} {s['mcc']:6.3f} {s['f1']:6.3f} {s['uniqueness']:7.3f} {s['variance_explained']:6.3f} "
        f"{s['l0']:6.1f} {s['dead_fraction']:6.3f} {s.get('absorption') or 0:7.3f} {seconds:6.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
