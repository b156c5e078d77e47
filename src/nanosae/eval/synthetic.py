"""Ground truth: activations built from known features, and how many of them an SAE finds.

A synthetic "model" (after SAELens's SynthSAEBench): N true features, unit directions in d dimensions (N ≫ d:
superposition), each firing independently with a Zipfian probability scaled so that a sample holds mean_l0 of
them on average, with a magnitude drawn around magnitude_mean; optionally features firing together in
correlated pairs, parent/child hierarchies (a child fires only when its parent does, with probability
child_prob then) and Gaussian noise. x = Σ magnitude_i · feature_i + noise. The same seed gives the same
features and the same samples, so every trainer can be handed exactly the same activations.

Scores of an SAE against the truth (eval.json's "synthetic" section):
  mcc            mean cosine of the best one-to-one matching between decoder rows and true features
                 (Hungarian), over the true features
  f1             mean F1 of each matched latent's firing against its true feature's firing, on fresh samples
  recovered      share of the true features whose matched decoder row has cosine > 0.9 (and by tenths of the
                 features, most frequent first: which frequencies an SAE finds)
  uniqueness     share of the true features that are the best match of at most one latent
  variance_explained, l0, dead_fraction   on fresh samples
  absorption     for hierarchies: of the samples where a parent and one of its children fire, the share where
                 the parent's matched latent is silent (the child's latent took the parent's direction)
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from nanosae import registry
from nanosae.config import SAEConfig, check_fields, check_range
from nanosae.errors import ConfigError
from nanosae.io import atomic_write, read_json, write_json
from nanosae.sae import SAE


@dataclass
class SyntheticConfig:
    """The synthetic model's features and how they fire."""

    n_features: int = 4096
    """True features."""
    d: int = 256
    """Width of the activations."""
    mean_l0: float = 25.0
    """True features active per sample, on average."""
    zipf: float = 1.0
    """Firing probabilities fall as rank^-zipf."""
    magnitude_mean: float = 1.0
    """Mean magnitude of a firing feature."""
    magnitude_std: float = 0.25
    """Spread of the magnitudes (kept at least 1% of the mean)."""
    correlated_pairs: int = 0
    """Pairs of features (the most frequent after the hierarchies) that fire together."""
    correlation: float = 0.5
    """The probability that a correlated pair's second feature fires because its first does."""
    parents: int = 0
    """Parent features, each with `children` children that fire only when it does."""
    children: int = 4
    """Children per parent."""
    child_prob: float = 0.3
    """The probability that a child fires when its parent does."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to every coordinate."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("n_features", "d"):
            check_range(name, getattr(self, name), 1)
        check_range("mean_l0", self.mean_l0, 0, self.n_features, open_low=True)
        for name in ("correlation", "child_prob"):
            check_range(name, getattr(self, name), 0, 1)
        for name in ("zipf", "magnitude_std", "noise", "correlated_pairs", "parents"):
            check_range(name, getattr(self, name), 0)
        check_range("magnitude_mean", self.magnitude_mean, 0, open_low=True)
        if self.parents * (1 + self.children) + 2 * self.correlated_pairs > self.n_features:
            raise ConfigError(
                f"{self.parents} parents with {self.children} children and {self.correlated_pairs} correlated pairs "
                f"need more than n_features={self.n_features} features"
            )


FEATURE_SEED = 0x5EED_F00D
RECOVERED_COSINE = 0.9  # a true feature counts as found when its matched decoder row is this close
FREQUENCY_BINS = 10
DENSE_PROBABILITY = 0.05  # features firing more often than this are drawn densely, the rest sparsely
SAMPLE_CHUNK = 1024  # samples drawn at a time: the stream does not depend on the batch size
PRESETS = {
    "tiny": SyntheticConfig(n_features=256, d=64, mean_l0=8.0, parents=8, correlated_pairs=8),
    "cpu": SyntheticConfig(n_features=4096, d=256, mean_l0=25.0, parents=64, correlated_pairs=64),
    "synthsaebench": SyntheticConfig(n_features=16384, d=768, mean_l0=25.0, parents=128, correlated_pairs=256),
}


class SyntheticModel:
    """Known features and a sampler of activations made of them."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        # a stream of its own: the global seed an SAE is initialised from must not draw the same directions
        gen = torch.Generator().manual_seed(FEATURE_SEED + cfg.seed)
        f = torch.randn(cfg.n_features, cfg.d, generator=gen)
        if cfg.n_features <= cfg.d:  # room for them all: orthogonal, no superposition
            f = torch.linalg.qr(f.T).Q.T
        self.features = f / f.norm(dim=1, keepdim=True)
        ranks = torch.randperm(cfg.n_features, generator=gen).double() + 1  # which feature gets which frequency
        p = ranks.pow(-cfg.zipf)
        # parents and pairs are the first features in id order; children only fire through their parents, so
        # the independent probabilities are scaled for the rest to give mean_l0 in all
        self.parent_of = torch.full((cfg.n_features,), -1, dtype=torch.long)
        n_tree = cfg.parents * (1 + cfg.children)
        for parent in range(cfg.parents):
            first = cfg.parents + parent * cfg.children
            self.parent_of[first : first + cfg.children] = parent
        self.pair_of = torch.full((cfg.n_features,), -1, dtype=torch.long)
        for pair in range(cfg.correlated_pairs):
            a = n_tree + 2 * pair
            self.pair_of[a + 1] = a
        independent = self.parent_of < 0
        self.probs = p.clone()
        second = self.pair_of >= 0

        def expected(scale: float) -> float:
            """Mean L0 at this scale: the independent features, the children through their parents, and what
            the correlated pairs' first features add to their seconds."""
            q = (p * scale).clamp(max=1)
            pulled = (1 - q[second]) * cfg.correlation * q[self.pair_of[second]]
            return float(q[independent].sum() + q[self.parent_of[~independent]].sum() * cfg.child_prob + pulled.sum())

        lo, hi = 0.0, 1.0
        while expected(hi) < cfg.mean_l0 and hi < 1e12:
            hi *= 2
        for _ in range(60):  # bisection on the scale that gives mean_l0
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) < cfg.mean_l0 else (lo, mid)
        self.probs = (p * hi).clamp(max=1).float()
        self._gen = gen

    def sample(self, n: int, gen: torch.Generator, dense: bool = True) -> tuple[Tensor, Tensor]:
        """(x (n, d), magnitudes (n, N), zero where a feature does not fire; with dense=False, a sparse COO
        tensor). Drawn sparsely: a sample holds mean_l0 of N features, so the cost follows the firings."""
        cfg = self.cfg
        rows, cols = self._fired(n, gen)
        # kept above zero, so a feature fires exactly where its magnitude is positive
        spread = cfg.magnitude_std * torch.randn(len(rows), generator=gen)
        values = (cfg.magnitude_mean + spread).clamp(min=0.01 * cfg.magnitude_mean)
        size = (n, cfg.n_features)
        mags = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, size, check_invariants=False).coalesce()
        x = mags.to_sparse_csr() @ self.features
        if cfg.noise:
            x = x + cfg.noise * torch.randn(n, cfg.d, generator=gen)
        return x, mags.to_dense() if dense else mags

    def _fired(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(rows, feature ids) of the firings in n samples, each pair once."""
        cfg = self.cfg
        own = (self.parent_of < 0).nonzero().squeeze(1)  # features that fire on their own
        common = own[self.probs[own] > DENSE_PROBABILITY]
        rare = own[self.probs[own] <= DENSE_PROBABILITY]
        r1, c1 = (torch.rand(n, len(common), generator=gen) < self.probs[common]).nonzero().unbind(1)
        pairs = [(r1, common[c1]), self._rare(n, rare, gen)]
        rows, cols = (torch.cat(v) for v in zip(*pairs))
        if cfg.parents:  # each child of a firing parent fires with child_prob
            firing = cols < cfg.parents
            r, parent = rows[firing].repeat_interleave(cfg.children), cols[firing].repeat_interleave(cfg.children)
            child = cfg.parents + parent * cfg.children + torch.arange(cfg.children).repeat(int(firing.sum()))
            kept = torch.rand(len(r), generator=gen) < cfg.child_prob
            rows, cols = torch.cat([rows, r[kept]]), torch.cat([cols, child[kept]])
        if cfg.correlated_pairs:  # a pair's second also fires with its first, with `correlation`
            first = self.pair_of[self.pair_of >= 0]
            is_first = torch.zeros(cfg.n_features, dtype=torch.bool)
            is_first[first] = True
            firing = is_first[cols]
            kept = torch.rand(int(firing.sum()), generator=gen) < cfg.correlation
            rows, cols = torch.cat([rows, rows[firing][kept]]), torch.cat([cols, cols[firing][kept] + 1])
            key = (rows * cfg.n_features + cols).unique()  # a second that also fired on its own fires once
            rows, cols = key // cfg.n_features, key % cfg.n_features
        return rows, cols

    def _rare(self, n: int, features: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Independent Bernoulli firings of rarely firing features in n samples, drawn as a binomial count per
        feature and that many distinct samples (duplicates drawn again: any draw symmetric in the samples gives a
        uniform subset), so the cost follows the number of firings, not n × features."""
        p = self.probs[features].double()
        counts = torch.binomial(torch.full_like(p, n), p, generator=gen).long()
        cols = features.repeat_interleave(counts)
        rows = torch.randint(0, n, (len(cols),), generator=gen)
        while True:
            order = (cols * n + rows).argsort()
            key = (cols * n + rows)[order]
            again = torch.zeros(len(rows), dtype=torch.bool)
            again[order[1:][key[1:] == key[:-1]]] = True
            if not again.any():
                return rows, cols
            rows[again] = torch.randint(0, n, (int(again.sum()),), generator=gen)

    @property
    def d_in(self) -> int:
        return self.cfg.d

    def activations(self, batch_size: int = 4096):
        """Endless samples (what the trainer reads its initialisation sample from)."""
        yield from self.batches(batch_size, seed=-1)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, **_: Any):
        """Endless batches of x, the same for the same seed (an ActivationStream's interface for the trainer): drawn
        in chunks of SAMPLE_CHUNK whatever the batch size, so trainers with other batch sizes see the same samples
        in the same order."""
        gen = torch.Generator().manual_seed(FEATURE_SEED + self.cfg.seed * 1_000_003 + seed + 1)
        yield from rebatch(iter(lambda: self.sample(SAMPLE_CHUNK, gen, dense=False)[0], None), batch_size)


def rebatch(chunks: Iterator[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Endless chunks of samples cut into batches of batch_size, in order (what lets trainers with other batch
    sizes read the same stream)."""
    left = next(chunks)
    while True:
        while len(left) < batch_size:
            left = torch.cat([left, next(chunks)])
        yield left[:batch_size]
        left = left[batch_size:]


def match(decoder: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(true feature ids, latent ids, cosines) of the best one-to-one matching of decoder rows to true features
    (Hungarian, maximising the summed cosine)."""
    d = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = features @ d.T  # (N, F)
    rows, cols = linear_sum_assignment(cos.double().numpy(), maximize=True)
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows_t, cols_t, cos[rows_t, cols_t]


@torch.no_grad()
def synthetic_scores(sae: Any, model: SyntheticModel, samples: int = 20_000, seed: int = 12345) -> dict[str, Any]:
    """The SAE against the truth (see the module docstring), on `samples` fresh samples."""
    features = model.features
    decoder = sae.W_dec.detach().float().cpu()
    true_ids, latents, cos = match(decoder, features)
    gen = torch.Generator().manual_seed(seed)
    x, mags = model.sample(samples, gen)
    x_hat, z = sae(x.to(sae.device, sae.dtype))
    x_hat, z = x_hat.float().cpu(), z.float().cpu()
    fired, active = mags > 0, z > 0
    tp = (fired[:, true_ids] & active[:, latents]).sum(0).double()
    f1 = 2 * tp / (fired[:, true_ids].sum(0) + active[:, latents].sum(0)).clamp(min=1)
    best = (features @ (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)).T).argmax(0)  # each latent's
    claims = torch.bincount(best, minlength=len(features))
    matched = torch.zeros(len(features))
    matched[true_ids] = cos.float()
    by_rate = model.probs.argsort(descending=True).chunk(FREQUENCY_BINS)  # most frequent tenth first
    out: dict[str, Any] = {
        "mcc": round(float(cos.mean()), 4) if len(cos) == len(features) else round(float(cos.sum()) / len(features), 4),
        "recovered": round(float((matched > RECOVERED_COSINE).float().mean()), 4),
        "recovered_by_frequency": [round(float((matched[b] > RECOVERED_COSINE).float().mean()), 4) for b in by_rate],
        "f1": round(float(f1.sum()) / len(features), 4),
        "uniqueness": round(float((claims <= 1).float().mean()), 4),
        "variance_explained": round(1 - float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), 4),
        "l0": round(float(active.sum(1).float().mean()), 3),
        "dead_fraction": round(float((~active.any(0)).float().mean()), 4),
        "true_l0": round(float(fired.sum(1).float().mean()), 3),
        "samples": samples,
    }
    child = model.parent_of >= 0
    if child.any():
        latent_of = torch.full((len(features),), -1, dtype=torch.long)
        latent_of[true_ids] = latents
        parents, kids = model.parent_of[child], child.nonzero().squeeze(1)
        both = fired[:, parents] & fired[:, kids]  # (n, children): parent and this child fire
        has = latent_of[parents] >= 0
        silent = ~active[:, latent_of[parents].clamp(min=0)] & has
        n = int(both[:, has].sum())
        out["absorption"] = round(float((both & silent).sum()) / n, 4) if n else None
    return out


def true_dictionary_sae(model: SyntheticModel) -> SAE:
    """An SAE whose decoder rows are the true features (and encoder their transposes): what MCC 1 looks like."""
    cfg = model.cfg
    sae = SAE(SAEConfig(d_in=cfg.d, d_sae=cfg.n_features, architecture="relu", apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_dec.copy_(model.features)
        sae.W_enc.copy_(model.features.T)
        sae.b_enc.fill_(-0.5 * cfg.magnitude_mean)  # interference below half a magnitude does not fire
    return sae.eval()


ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu")


def at_l0(architecture: str, l0: int) -> dict[str, Any]:
    """The setting that puts an architecture at this L0: k for the TopK family, target_l0 for JumpReLU."""
    return {"k": l0} if registry.get(architecture).uses_k else {"target_l0": float(l0)}


SCORE_ROWS = ("mcc", "f1", "recovered", "uniqueness", "variance_explained", "l0", "dead_fraction", "absorption")


def run_synthetic(
    preset: str,
    out: Path,
    samples: int,
    saes: dict[str, Any] | None = None,
    architectures: tuple[str, ...] = ARCHITECTURES,
    progress: Any = None,
) -> dict[str, Any]:
    """Score SAEs against a preset's true features, writing out/eval.json (its "synthetic" section) and
    out/report.html. Without `saes`, nanosae's architectures are trained first on `samples` of the preset's
    stream, all in one pass over the same samples (at k = the preset's mean L0, JumpReLU trained towards that L0,
    d_sae = its number of features)."""
    import nanosae

    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; expected one of {', '.join(PRESETS)}")
    model = SyntheticModel(PRESETS[preset])
    trained = saes is None
    if saes is None:
        k = round(model.cfg.mean_l0)
        cfgs = [
            nanosae.TrainConfig.build(
                out=str(out / arch),
                architecture=arch,
                d_sae=model.cfg.n_features,
                tokens=samples,
                batch_size=max(256, samples // 1000),
                **at_l0(arch, k),
            )
            for arch in architectures
        ]
        saes = {
            arch: result.sae
            for arch, result in zip(architectures, nanosae.train(cfgs, progress, source=cast(Any, model)))
        }
    for name, sae in saes.items():
        if sae.cfg.d_in != model.cfg.d:
            raise ConfigError(f"{name}: d_in is {sae.cfg.d_in}, the {preset} preset's activations have d={model.cfg.d}")
    results = {name: synthetic_scores(sae, model) for name, sae in saes.items()}
    section = {"preset": preset, "config": asdict(model.cfg), "trained_samples": samples if trained else None}
    existing = read_json(out / "eval.json") if (out / "eval.json").exists() else {}  # other sections stay
    write_json(out / "eval.json", existing | {"synthetic": section | {"results": results}})
    page = render_synthetic(results, section)
    atomic_write(out / "report.html", lambda p: p.write_text(page, encoding="utf-8"))
    return results


def render_synthetic(results: dict[str, dict[str, Any]], section: dict[str, Any]) -> str:
    """The report page: the scores side by side and which feature frequencies each SAE recovers."""
    from nanosae.eval.report import _figure, _fmt, page

    names = list(results)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{k}</th>" + "".join(f"<td>{_fmt(results[n].get(k))}</td>" for n in names) + "</tr>"
        for k in SCORE_ROWS
    )

    def draw(ax: Any) -> None:
        for name in names:
            shares = results[name]["recovered_by_frequency"]
            ax.plot(range(1, len(shares) + 1), shares, marker="o", label=name)
        ax.set_ylim(0, 1.02)

    plot = _figure("true features by firing frequency (tenths, most frequent first)", "share recovered", draw)
    cfg = section["config"]
    trained = section["trained_samples"]
    title = f"nanosae evaluation: synthetic ground truth ({section['preset']})"
    return page(
        title,
        f"""<p>{cfg["n_features"]:,} true features in {cfg["d"]} dimensions, mean L0 {cfg["mean_l0"]},
{cfg["parents"]} parents with {cfg["children"]} children, {cfg["correlated_pairs"]} correlated pairs,
seed {cfg["seed"]}.
{f"Each SAE trained on the same {trained:,} samples." if trained else ""}</p>
<table><tr><th>score</th>{head}</tr>{rows}</table>
<p class="note">mcc: mean cosine of the best one-to-one match of decoder rows to true features; f1: each matched
latent's firing against its feature's; recovered: share of true features matched at cosine &gt; {RECOVERED_COSINE};
absorption: where a parent and its child fire, the share with the parent's latent silent.</p>
<figure><img alt="recovered by frequency" src="{plot}"></figure>""",
    )
