"""nanosae beside SAELens on SynthSAEBench-16k itself, scored by SAELens's own evaluation (peers' venv).

The world is SAELens's SyntheticModel with the configuration SynthSAEBench documents for SynthSAEBench-16k (16,384
true features in 768 dimensions, Zipfian firing, 128 trees of depth 3 with mutually exclusive children, rank-25
correlations, orthogonalised directions, seed 42), built with SAELens's own code and cached under --world (the
build orthogonalises for a long while on a CPU), or loaded from the Hub id where there is a connection
(--hub decoderesearch/synth-sae-bench-16k-v2). Every trainer reads the same samples: chunks of 1,024, chunk i drawn
under seed i with the global generator saved and restored around it, cut into each trainer's batches in order.
SAEs at SynthSAEBench's recommended width 4,096 and k 25; SAELens's trainers with its benchmark settings (batch
1,024, lr 3e-4 constant). Every SAE is scored by SAELens's eval_sae_on_synthetic_data on the same fresh samples,
so its figures sit beside the published ones (which trained on 200M samples and evaluated on 500k).
SAELens's sampler draws about 1,400 samples/s here on 2 cores, slower than either trainer reads, so the training
samples are drawn once into the world's folder (train-SAMPLES.npy, 3 GB per million) and read back by each trainer.
Usage: .venv-bench/bin/python benchmarks/synthsaebench.py [--samples 2M] [--draw-only] [--architecture topk]
       [--peers] [--peers-only] [--variant JSON] [--eval-samples 100k]
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from _results import save
from synthetic import compare, trainer_args
from tqdm import tqdm

from nanosae.eval.synthetic import rebatch
from nanosae.options import parse_count

CHUNK = 1024
EVAL_SEED = 12345


def world_config():
    """SynthSAEBench-16k's configuration, as SynthSAEBench's docs give it."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=16_384,
        hidden_dim=768,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=128,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def load_world(path: Path, hub: str | None):
    from sae_lens.synthetic import SyntheticModel

    if hub:
        return SyntheticModel.from_pretrained(hub)
    if not path.exists():
        SyntheticModel(world_config()).save(path)
    return SyntheticModel.load_from_disk(path)


class World:
    """A SAELens SyntheticModel as a source nanosae's trainer reads (d_in, batches, activations); the training
    stream's first chunks come from the file drawn once where there is one."""

    def __init__(self, synthetic, cached: np.ndarray | None = None):  # not `model`: a source's host model
        self.synthetic, self.d_in, self.cached = synthetic, synthetic.cfg.hidden_dim, cached

    def chunk(self, i: int) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(i)
            return self.synthetic.sample(CHUNK)

    def chunks(self, seed: int):
        for i in range(seed * 1_000_000_000, 2**62):
            if seed == 0 and self.cached is not None and (i + 1) * CHUNK <= len(self.cached):
                yield torch.from_numpy(np.array(self.cached[i * CHUNK : (i + 1) * CHUNK]))
            else:
                yield self.chunk(i)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, **_):
        yield from rebatch(self.chunks(seed), batch_size)

    def activations(self, batch_size: int = 4096):
        yield from self.batches(batch_size, seed=-1)


def cached_stream(world: World, path: Path, samples: int) -> np.ndarray:
    """The training stream's first `samples` drawn once into a .npy file (memory-mapped when read back)."""
    chunks = math.ceil(samples / CHUNK)
    if not path.exists() or np.load(path, mmap_mode="r").shape[0] < chunks * CHUNK:
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(chunks * CHUNK, world.d_in))
        for i in tqdm(range(chunks), desc=f"drawing {path.name}"):
            out[i * CHUNK : (i + 1) * CHUNK] = world.chunk(i).numpy()
        out.flush()
        del out
        tmp.rename(path)
    return np.load(path, mmap_mode="r")


class NanosaeForEval:
    """nanosae's SAE as SAELens's evaluation reads one: W_dec, encode, decode (the normalisation carried between)."""

    def __init__(self, sae):
        self.sae, self.W_dec, self._norm = sae, sae.W_dec, None

    def eval(self):
        return self

    def encode(self, x):
        z, self._norm = self.sae.encode(x, return_norm=True)
        return z

    def decode(self, z):
        return self.sae.decode(z, self._norm)


def score(sae, model, samples: int) -> dict:
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(EVAL_SEED)
        r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, samples, batch_size=2048)
    c = r.classification
    return {
        "mcc": r.mcc,
        "f1": c.f1_score,
        "precision": c.precision,
        "recall": c.recall,
        "uniqueness": r.uniqueness,
        "variance_explained": r.explained_variance,
        "l0": r.sae_l0,
        "dead": r.dead_latents,
        "true_l0": r.true_l0,
    }


def report(name: str, s: dict, seconds: float, figures: dict) -> None:
    figures[name] = s | {"seconds": round(seconds, 1)}
    print(
        f"{name:28} {s['mcc']:6.3f} {s['f1']:6.3f} {s['precision']:6.3f} {s['recall']:6.3f} {s['uniqueness']:7.3f} "
        f"{s['variance_explained']:6.3f} {s['l0']:6.1f} {s['dead']:6d} {seconds:6.0f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", default="2M")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=25)
    trainer_args(p)
    p.add_argument("--eval-samples", default="100k")
    p.add_argument("--world", type=Path, default=Path("runs/synthsaebench-16k"), help="where the built world is kept")
    p.add_argument("--hub", default=None, help="load the world from this Hub id instead")
    p.add_argument("--draw-only", action="store_true", help="draw the training samples into the world's folder")
    args = p.parse_args()
    model = load_world(args.world, args.hub)
    samples, eval_samples = parse_count(args.samples), parse_count(args.eval_samples)
    world = World(model)
    world.cached = cached_stream(world, args.world / f"train-{args.samples}.npy", samples)
    if args.draw_only:
        return
    print(f"SynthSAEBench-16k: d_sae {args.d_sae}, k {args.k}, {samples:,} samples, scored on {eval_samples:,}")
    print(
        f"{'':28} {'MCC':>6} {'F1':>6} {'prec':>6} {'recall':>6} {'unique':>7} {'VE':>6} {'L0':>6} {'dead':>6} {'s':>6}"
    )

    def scored(sae, peer: bool) -> dict:
        return score(sae.sae if peer else NanosaeForEval(sae), model, eval_samples)

    figures = compare(args, world, samples, args.d_sae, args.k, ["topk"], scored, report)
    save(__file__, {"samples": samples, "d_sae": args.d_sae, "k": args.k, "variant": args.variant, "results": figures})


if __name__ == "__main__":
    main()
