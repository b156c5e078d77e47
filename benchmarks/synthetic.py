"""Which architecture finds the true features? nanosae's on the synthetic ground truth (eval/synthetic.py).

Every trainer gets exactly the same samples (the synthetic model's stream, one seed) and the same L0 target;
each SAE is scored on fresh samples: MCC, feature F1, uniqueness, variance explained, L0, dead latents and, for
the hierarchies, absorption. The comparison with SAELens's trainers of the same architectures (same samples,
peer venv only) is not written yet: see the issue's notes.
Usage: python benchmarks/synthetic.py [--preset cpu] [--samples 10M] [--d-sae 4096] [--k 25]
"""

import argparse
import tempfile
import time

from _results import save

import nanosae
from nanosae.eval.synthetic import PRESETS, SyntheticModel, synthetic_scores
from nanosae.options import parse_count

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--samples", default="10M")
    p.add_argument("--d-sae", type=int, default=None, help="default: the preset's number of true features")
    p.add_argument("--k", type=int, default=None, help="default: the preset's mean L0")
    p.add_argument("--architecture", action="append", default=None)
    args = p.parse_args()
    model = SyntheticModel(PRESETS[args.preset])
    samples = parse_count(args.samples)
    d_sae = args.d_sae or model.cfg.n_features
    k = args.k or round(model.cfg.mean_l0)
    figures = {}
    print(
        f"{args.preset}: {model.cfg.n_features} true features in {model.cfg.d} dims, mean L0 "
        f"{model.cfg.mean_l0}; d_sae {d_sae}, k {k}, {samples:,} samples"
    )
    print(f"{'':12} {'MCC':>6} {'F1':>6} {'unique':>7} {'VE':>6} {'L0':>6} {'dead':>6} {'absorb':>7} {'s':>6}")
    for arch in args.architecture or ARCHITECTURES:
        with tempfile.TemporaryDirectory() as tmp:
            extra = {"k": k} if arch != "jumprelu" else {}
            cfg = nanosae.TrainConfig.build(out=tmp, architecture=arch, d_sae=d_sae, tokens=samples, **extra)
            t0 = time.perf_counter()
            sae = nanosae.train(cfg, source=model).sae
            seconds = time.perf_counter() - t0
        s = synthetic_scores(sae, model) | {"seconds": round(seconds, 1)}
        figures[arch] = s
        print(
            f"{arch:12} {s['mcc']:6.3f} {s['f1']:6.3f} {s['uniqueness']:7.3f} {s['variance_explained']:6.3f} "
            f"{s['l0']:6.1f} {s['dead_fraction']:6.3f} {s.get('absorption') or 0:7.3f} {seconds:6.0f}"
        )
    save(__file__, {"preset": args.preset, "samples": samples, "d_sae": d_sae, "k": k, "results": figures})


if __name__ == "__main__":
    main()
