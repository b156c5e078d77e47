"""nanosae's synthetic generator against SAELens's own (ActivationGenerator, peers' venv) at the same settings.

SAELens is given nanosae's preset feature by feature: each feature's firing probability (a child's is its
probability when its parent fires), the parent/child trees as SAELens hierarchies (a child is switched off where its
parent is silent), the magnitudes' mean and spread, and for each correlated pair a Gaussian-copula correlation
solved so that the pair fires together as often as nanosae's rule makes it (the second fires with the first with
probability `correlation`, besides on its own). Both then draw the same number of samples, and the statistics are
compared with their sampling error: every feature's firing rate, the L0's mean and spread, P(child | parent), a
child firing without its parent, P(both | first) for the pairs, and the firing magnitudes.

Usage: .venv-bench/bin/python benchmarks/synthetic_generator.py [--preset cpu] [--samples 200000]
"""

import argparse
import math

import torch
from _results import save


def copula_correlation(p_a: float, p_b: float, joint: float) -> float:
    """ρ of a bivariate normal whose two thresholds fire at rates p_a, p_b and together at `joint`."""
    from scipy.optimize import brentq
    from scipy.stats import multivariate_normal, norm

    t_a, t_b = norm.ppf(1 - p_a), norm.ppf(1 - p_b)

    def excess(rho: float) -> float:  # P(both above their thresholds) − joint
        both_below = multivariate_normal.cdf([t_a, t_b], mean=[0, 0], cov=[[1, rho], [rho, 1]])
        return float(1 - norm.cdf(t_a) - norm.cdf(t_b) + both_below - joint)

    return brentq(excess, -0.999, 0.999, xtol=1e-6)


def saelens_twin(model):
    """SAELens's ActivationGenerator with nanosae's settings, feature by feature."""
    from sae_lens.synthetic.activation_generator import ActivationGenerator
    from sae_lens.synthetic.hierarchy.modifier import hierarchy_modifier
    from sae_lens.synthetic.hierarchy.node import HierarchyNode

    cfg = model.cfg
    probs = model.probs.clone()
    children = model.parent_of >= 0
    probs[children] = cfg.child_prob
    roots = [
        HierarchyNode(p, [HierarchyNode(int(c)) for c in (model.parent_of == p).nonzero().squeeze(1).tolist()])
        for p in range(cfg.parents)
    ]
    correlation = None
    seconds = (model.pair_of >= 0).nonzero().squeeze(1)
    if len(seconds):  # low rank, as SAELens samples large ones: a pair's [[1, ρ], [ρ, 1]] = v vᵀ + (1 − ρ) I, v = √ρ
        factor, diag = torch.zeros(cfg.n_features, len(seconds)), torch.ones(cfg.n_features)
        for column, b in enumerate(seconds.tolist()):
            a = int(model.pair_of[b])
            p_a, own = float(model.probs[a]), float(model.probs[b])
            p_b = own + (1 - own) * cfg.correlation * p_a  # nanosae's marginal of the second
            probs[b] = p_b
            rho = copula_correlation(p_a, p_b, p_a * (own + (1 - own) * cfg.correlation))
            factor[[a, b], column] = math.sqrt(rho)
            diag[[a, b]] = 1 - rho
        correlation = (factor, diag)
    return ActivationGenerator(
        cfg.n_features,
        probs,
        std_firing_magnitudes=cfg.magnitude_std,
        mean_firing_magnitudes=cfg.magnitude_mean,
        modify_activations=hierarchy_modifier(roots) if roots else None,
        correlation_matrix=correlation,
    )


def statistics(mags: torch.Tensor, model) -> dict[str, torch.Tensor | float]:
    """What the two generators are compared on, from (samples, features) magnitudes."""
    fired = mags > 0
    n = len(fired)
    stats: dict[str, torch.Tensor | float] = {"rate": fired.float().mean(0), "n": n}
    l0 = fired.sum(1).float()
    stats["l0_mean"], stats["l0_std"] = float(l0.mean()), float(l0.std())
    values = mags[fired]
    stats["magnitude_mean"], stats["magnitude_std"] = float(values.mean()), float(values.std())
    children = (model.parent_of >= 0).nonzero().squeeze(1)
    if len(children):
        parent_on = fired[:, model.parent_of[children]]
        stats["child_given_parent"] = float(fired[:, children][parent_on].float().mean())
        stats["parent_fires"] = int(parent_on.sum())
        stats["child_without_parent"] = int((fired[:, children] & ~parent_on).sum())
    seconds = (model.pair_of >= 0).nonzero().squeeze(1)
    if len(seconds):
        first_on = fired[:, model.pair_of[seconds]]
        stats["second_given_first"] = float(fired[:, seconds][first_on].float().mean())
        stats["first_fires"] = int(first_on.sum())
    return stats


def main() -> None:
    from nanosae.eval.synthetic import PRESETS, SyntheticModel

    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--chunk", type=int, default=10_000)
    args = p.parse_args()
    torch.manual_seed(0)
    model = SyntheticModel(PRESETS[args.preset])
    twin = saelens_twin(model)
    gen = torch.Generator().manual_seed(1)
    ours = torch.cat([model.sample(args.chunk, gen)[1] for _ in range(args.samples // args.chunk)])
    theirs = torch.cat([twin.sample(args.chunk) for _ in range(args.samples // args.chunk)])
    a, b = statistics(ours, model), statistics(theirs, model)
    n = args.samples
    # each feature's rate: the two estimates' difference over its standard error
    pooled = (a["rate"] + b["rate"]) / 2
    z = (a["rate"] - b["rate"]) / (2 * pooled * (1 - pooled) / n).clamp_min(1e-12).sqrt()
    rows = {
        "feature rates: largest |z| over features": (float(z.abs().max()), None),
        "feature rates: share of |z| > 3": (float((z.abs() > 3).float().mean()), None),
        "L0 mean": (a["l0_mean"], b["l0_mean"]),
        "L0 standard deviation": (a["l0_std"], b["l0_std"]),
        "magnitude mean": (a["magnitude_mean"], b["magnitude_mean"]),
        "magnitude standard deviation": (a["magnitude_std"], b["magnitude_std"]),
    }
    se = lambda q, count: math.sqrt(q * (1 - q) / max(count, 1))  # a proportion's standard error
    if "child_given_parent" in a:
        q = model.cfg.child_prob
        rows["P(child | parent)"] = (a["child_given_parent"], b["child_given_parent"], q, se(q, a["parent_fires"]))
        rows["child firings without the parent"] = (a["child_without_parent"], b["child_without_parent"], 0, 0)
    if "second_given_first" in a:
        seconds = (model.pair_of >= 0).nonzero().squeeze(1)
        p_first, own = model.probs[model.pair_of[seconds]], model.probs[seconds]
        q = float((p_first * (own + (1 - own) * model.cfg.correlation)).sum() / p_first.sum())
        pair = (a["second_given_first"], b["second_given_first"], q, se(q, a["first_fires"]))
        rows["P(pair's second | first)"] = pair
    rows["L0 mean"] += (model.cfg.mean_l0, math.sqrt(a["l0_std"] ** 2 / n))
    print(f"preset {args.preset}, {n:,} samples each (nanosae | SAELens ActivationGenerator | set | standard error)")
    for name, row in rows.items():
        print(f"  {name:<40}" + " | ".join("" if v is None else f"{v:10.4f}" for v in row))
    apart = abs(a["l0_mean"] - b["l0_mean"]) / math.sqrt(a["l0_std"] ** 2 / n + b["l0_std"] ** 2 / n)
    print(f"  (|z| > 3: 0.27% of features by chance; the L0 means are {apart:.1f} standard errors apart)")
    save(__file__, {"preset": args.preset, "samples": n, "rows": {k: list(v) for k, v in rows.items()}})


if __name__ == "__main__":
    main()
