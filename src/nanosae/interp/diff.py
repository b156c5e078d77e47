"""Model diffing: what a crosscoder over one hook of two models (A, B) says each model has of its own.

A model-diffing crosscoder (train --diff A_STORE B_STORE) shares one latent space and keeps one decoder per
model. For each latent:
  relative norm   |d_B| / (|d_A| + |d_B|) of its decoder rows, in the space where both models' activations have
                  the same mean norm (the crosscoder's own, scaled inputs): near 0 A-only, near 1
                  B-only, near 0.5 shared (Lindsey et al. 2024, "Sparse Crosscoders")
  cosine          of its two decoder rows (a shared latent that means the same thing in both is near 1)
  change          |d_B − d_A| / (|d_A| + |d_B|): 0 written alike by both, near 1 written by one model only or
                  in opposite directions (a concept both have that one of them writes differently)
  latent scaling  (Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders"): for a latent j
                  claimed by one model, with its decoder row d there and activation f, the least-squares
                  β_M = Σ f (d·y_M) / (|d|² Σ f²) of how much of d each model M carries, fitted to
                    y_M = x_M − x̂_M + f d_M   (M's error with j's own part put back)      -> β^ε_M
                    y_M = x̂_M                 (the owner's reconstruction)                -> β^r_owner
                    y_M = x̂_M − f d_M         (the other's reconstruction by other latents) -> β^r_other
                  and the ratios ν^ε = β^ε_other / β^ε_owner, ν^r = β^r_other / β^r_owner. A latent the
                  other model carries too (its decoder there shrunk to zero by an L1 penalty, "complete
                  shrinkage", or its role taken by other latents, "latent decoupling") has a large ν;
                  one that is really the owner's own has both near 0.
Latents are ranked by specificity = 1 − max(ν^ε, ν^r): the share of the latent the other model does not
carry by either route.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nanosae.errors import ConfigError
from nanosae.sae import SAE

ONLY, SHARED = 0.1, (0.4, 0.6)  # relative-norm bands: A-only below 0.1, B-only above 0.9, shared in 0.4..0.6
MIN_FREQUENCY = 5e-4  # latents firing on fewer tokens are barely trained: left out of the "changed" ranking


def check_diff(sae: SAE) -> None:
    if not sae.cfg.crosscoder_models or len(sae.cfg.crosscoder_models) != 2:
        raise ConfigError(
            "not a model-diffing crosscoder (one hook of two models): train one with "
            "`nanosae train --diff A_STORE B_STORE` on stores from `nanosae collect --model A --model B`"
        )


def factors(sae: SAE) -> Tensor:
    """Each model's activation scale: what its activations are multiplied by so both have the same mean norm."""
    factor = sae.output_factor()
    return factor.view(2, -1)[:, 0].float().cpu() if isinstance(factor, Tensor) else torch.tensor([factor, factor])


def decoders(sae: SAE, scaled: bool = True) -> tuple[Tensor, Tensor]:
    """Each latent's decoder rows for A and B: in the scaled space the crosscoder works in, where both models'
    activations have the same mean norm (so a model whose activations are larger does not look like it owns
    every latent), or with scaled=False in each model's own units (what steering adds)."""
    check_diff(sae)
    w = sae.W_dec.detach().float().cpu().view(sae.cfg.d_sae, 2, -1)
    f = torch.ones(2) if scaled else factors(sae)
    return w[:, 0] / f[0], w[:, 1] / f[1]


def relative_norms(sae: SAE) -> Tensor:
    """|d_B| / (|d_A| + |d_B|) per latent, in the scaled space: 0 A-only, 1 B-only."""
    a, b = (d.norm(dim=1) for d in decoders(sae))
    return b / (a + b).clamp_min(1e-12)


def classes(relative: Tensor) -> list[str]:
    return [
        "A-only" if r < ONLY else "B-only" if r > 1 - ONLY else "shared" if SHARED[0] <= r <= SHARED[1] else "other"
        for r in relative.tolist()
    ]


@dataclass
class Scaling:
    """Latent scaling of some latents (each owned by A or B), summed over the tokens seen."""

    latents: Tensor  # (n,) latent ids
    owner: Tensor  # (n,) 0 = A, 1 = B: the model whose decoder row d is fitted
    beta_error: Tensor  # (n, 2) β^ε for A and B
    beta_reconstruction: Tensor  # (n, 2) β^r for A and B
    every_frequency: Tensor  # (d_sae,) share of tokens each latent of the SAE fires on (the pass encodes them all)

    @property
    def frequency(self) -> Tensor:
        """(n,) share of tokens each of `latents` fires on."""
        return self.every_frequency[self.latents]

    def ratios(self) -> tuple[Tensor, Tensor]:
        """(ν^ε, ν^r): the other model's β over the owner's."""
        rows = torch.arange(len(self.latents))

        def ratio(beta: Tensor) -> Tensor:
            return beta[rows, 1 - self.owner] / beta[rows, self.owner].abs().clamp_min(1e-12)

        return ratio(self.beta_error), ratio(self.beta_reconstruction)


@torch.no_grad()
def latent_scaling(sae: SAE, batches: Iterable[Tensor], latents: Tensor, owner: Tensor) -> Scaling:
    """β^ε and β^r of `latents` (owner: 0 = A's decoder row, 1 = B's) over batches of [x_A, x_B] side by side,
    in the scaled space."""
    dec_a, dec_b = decoders(sae)
    scale = factors(sae)
    d_model = dec_a.shape[1]
    rows = torch.stack([dec_a[latents], dec_b[latents]], 1)  # (n, 2, d): each latent's rows in A and B
    direction = rows[torch.arange(len(latents)), owner]  # (n, d): d, the owner's row
    along = (rows * direction[:, None]).sum(-1)  # (n, 2): d · d_M
    num_e, num_r = torch.zeros(len(latents), 2, dtype=torch.float64), torch.zeros(len(latents), 2, dtype=torch.float64)
    f2, fired, seen = torch.zeros(len(latents), dtype=torch.float64), torch.zeros(sae.cfg.d_sae), 0
    for x in batches:
        x = x.to(sae.device, sae.dtype)
        x_hat, z = sae(x)
        f = z[:, latents].float().cpu()  # (t, n)
        for m in range(2):
            block = slice(m * d_model, (m + 1) * d_model)
            x_m, x_hat_m = x[:, block].float().cpu() * scale[m], x_hat[:, block].float().cpu() * scale[m]
            err = (x_m - x_hat_m) @ direction.T  # (t, n): d · (x_M − x̂_M)
            rec = x_hat_m @ direction.T  # d · x̂_M
            own = f * along[:, m]  # d · f d_M
            other = (owner != m).float()  # the owner's reconstruction keeps j's part; the other's is without it
            num_e[:, m] += (f * (err + own)).sum(0).double()
            num_r[:, m] += (f * (rec - other * own)).sum(0).double()
        f2 += f.pow(2).sum(0).double()
        fired += (z > 0).sum(0).float().cpu()
        seen += len(x)
    den = (direction.pow(2).sum(1).double() * f2).clamp_min(1e-30)[:, None]
    return Scaling(latents, owner, (num_e / den).float(), (num_r / den).float(), fired / max(seen, 1))


def diff_report(sae: SAE, batches: Iterable[Tensor], top: int = 20) -> dict[str, Any]:
    """Every latent's relative norm, class, cosine, change and firing frequency; latent scaling of the A-only and
    B-only latents, each list ranked by specificity (1 − max(ν^ε, ν^r)) among latents that fire; and the latents
    the two models write most differently (by change, among those firing on MIN_FREQUENCY of tokens): where a
    fine-tune changed what a concept both models have writes, rather than adding one of B's own."""
    dec_a, dec_b = decoders(sae)
    relative = relative_norms(sae)
    kind = classes(relative)
    cosine = torch.nn.functional.cosine_similarity(dec_a, dec_b, dim=1)
    change = (dec_b - dec_a).norm(dim=1) / (dec_a.norm(dim=1) + dec_b.norm(dim=1)).clamp_min(1e-12)
    only = torch.tensor([k in ("A-only", "B-only") for k in kind])
    latents = only.nonzero().squeeze(1)
    owner = (relative[latents] > 0.5).long()
    scaling = latent_scaling(sae, batches, latents, owner)
    nu_e, nu_r = scaling.ratios()
    ranked: dict[str, list[dict[str, Any]]] = {"A-only": [], "B-only": []}
    for i, j in enumerate(latents.tolist()):
        if scaling.frequency[i] <= 0:
            continue
        ranked[kind[j]].append(
            {
                "latent": j,
                "relative_norm": round(float(relative[j]), 4),
                "nu_error": round(float(nu_e[i]), 4),
                "nu_reconstruction": round(float(nu_r[i]), 4),
                "specificity": round(1 - max(float(nu_e[i]), float(nu_r[i])), 4),
                "frequency": round(float(scaling.frequency[i]), 6),
            }
        )
    for name in ranked:
        ranked[name].sort(key=lambda r: (-r["specificity"], -r["frequency"]))
    shared = torch.tensor([k == "shared" for k in kind])
    counts = {name: kind.count(name) for name in ("A-only", "B-only", "shared", "other")}
    report: dict[str, Any] = {
        "models": list(sae.cfg.crosscoder_models or []),
        "hook": sae.cfg.hook_name,
        "counts": counts,
        "histogram": torch.histc(relative, bins=50, min=0, max=1).long().tolist(),
        "shared_cosine_median": round(float(cosine[shared].median()), 4) if shared.any() else None,
        "relative_norm": [round(v, 4) for v in relative.tolist()],
        "cosine": [round(v, 4) for v in cosine.tolist()],
        "change": [round(v, 4) for v in change.tolist()],
        "A-only": ranked["A-only"][:top],
        "B-only": ranked["B-only"][:top],
        "frequency": [round(v, 6) for v in scaling.every_frequency.tolist()],
    }
    fired = (scaling.every_frequency >= MIN_FREQUENCY).nonzero().squeeze(1)
    report["changed"] = [
        {"latent": j} | {key: report[key][j] for key in ("relative_norm", "cosine", "change", "frequency")}
        for j in fired[change[fired].argsort(descending=True)][:top].tolist()
    ]
    return report


def paired_batches(stores: list[Any], tokens: int, batch: int = 4096) -> Iterable[Tensor]:
    """[x_A, x_B] side by side from the two stores, over their first `tokens` tokens."""
    n = min(tokens, len(stores[0]))
    for i in range(0, n, batch):
        yield torch.cat([s.tokens(i, min(i + batch, n)) for s in stores], 1)


def run_stores(run: Any) -> list[str]:
    """The two stores a diff run was trained on (its config.json)."""
    from nanosae.io import read_json

    source = read_json(run.config).get("source") or {}
    acts = source.get("crosscoder_acts") or []
    if len(acts) != 2:
        raise ConfigError(f"{run.config} names no pair of stores; give them with --acts A_STORE --acts B_STORE")
    return list(acts)


def render_diff(report: dict[str, Any], explanations: dict[int, str] | None = None) -> str:
    """diff.html: the relative-norm histogram (as the paper plots it) and the ranked A-only and B-only latents."""
    import html

    from nanosae.eval.report import _figure, page

    a, b = report["models"]
    counts = report["histogram"]

    def draw(ax: Any) -> None:
        ax.bar([(i + 0.5) / len(counts) for i in range(len(counts))], counts, width=1 / len(counts))
        ax.set_yscale("log")
        for x in (ONLY, 1 - ONLY):
            ax.axvline(x, color="grey", lw=0.8, ls="--")

    plot = _figure(
        f"relative decoder norm |d_B| / (|d_A| + |d_B|)   (0: {a} only, 1: {b} only)", "latents", draw, legend=False
    )
    explain = explanations or {}

    def table(name: str) -> str:
        rows = "".join(
            f"<tr><td>{r['latent']}</td><td>{r['relative_norm']:.3f}</td><td>{r['nu_error']:.3f}</td>"
            f"<td>{r['nu_reconstruction']:.3f}</td><td>{r['specificity']:.3f}</td><td>{r['frequency']:.4%}</td>"
            f"<td style='text-align:left'>{html.escape(explain.get(r['latent'], ''))}</td></tr>"
            for r in report[name]
        )
        return (
            f"<h2>{html.escape(name.replace('A', a, 1) if name.startswith('A') else name.replace('B', b, 1))}"
            f" latents ({report['counts'][name]})</h2><table><tr><th>latent</th><th>relative norm</th><th>ν error"
            f"</th><th>ν reconstruction</th><th>specificity</th><th>fires on</th><th>explanation</th></tr>{rows}"
            "</table>"
        )

    changed = "".join(
        f"<tr><td>{r['latent']}</td><td>{r['relative_norm']:.3f}</td><td>{r['cosine']:.3f}</td>"
        f"<td>{r['change']:.3f}</td><td>{r['frequency']:.4%}</td>"
        f"<td style='text-align:left'>{html.escape(explain.get(r['latent'], ''))}</td></tr>"
        for r in report.get("changed", [])
    )
    c = report["counts"]
    title = f"What differs between {a} (A) and {b} (B) at {report['hook']}"
    return page(
        title,
        f"""<p>{c["A-only"]} A-only, {c["B-only"]} B-only, {c["shared"]} shared and {c["other"]}
other latents; shared latents' decoder rows have median cosine {report["shared_cosine_median"]}.</p>
<img alt="relative decoder norms" src="{plot}">
<p class="note">ν error and ν reconstruction (latent scaling): how much of the latent's decoder direction the other
model carries in its error and in its other latents, over the owner's; specificity = 1 − the larger. A latent
with a high ν is carried by both models, whatever its decoder norms say (Minder et al. 2025).</p>
{table("B-only")}{table("A-only")}
<h2>Written most differently by the two models</h2>
<p class="note">change = |d_B − d_A| / (|d_A| + |d_B|), among latents firing on at least {MIN_FREQUENCY:.2%} of tokens:
a concept both models have that one of them writes otherwise (a fine-tune often changes these rather than adding
latents of its own).</p>
<table><tr><th>latent</th><th>relative norm</th><th>cosine</th><th>change</th><th>fires on</th><th>explanation</th>
</tr>{changed}</table>""",
    )


@torch.no_grad()
def activity(sae: SAE, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Each latent's mean activation where it fires (0 where it never does: a steering value of its own size), the
    share of tokens it fires on, and the index of its largest activation (-1 where it never fires), in one pass."""
    total, count = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae)
    best, where, seen = torch.zeros(sae.cfg.d_sae), torch.full((sae.cfg.d_sae,), -1, dtype=torch.long), 0
    for x in batches:
        z = sae.encode(x.to(sae.device, sae.dtype)).float().cpu()
        total += z.sum(0)
        count += (z > 0).sum(0)
        value, index = z.max(0)
        better = value > best
        best[better], where[better] = value[better], index[better] + seen
        seen += len(z)
    return total / count.clamp(min=1), count / max(seen, 1), where


@torch.no_grad()
def side_by_side(models: list[Any], sae: SAE, windows: list[list[int]], latent: int) -> list[dict[str, list[float]]]:
    """Each window of token ids (-1: unknown, shown as 0) run through both models: the latent's activation on
    every token from the pair as the crosscoder was trained ("both"), and from each model alone, its
    activations read in both places ("A", "B"): a latent B has of its own fires on B's and not on A's."""
    check_diff(sae)
    hook = sae.cfg.hook_name
    out = []
    for ids in windows:
        known = torch.tensor([i >= 0 for i in ids])
        tokens = torch.tensor([[models[0].tokenizer.bos_id, *[i for i in ids if i >= 0]]])
        xs = [m.run_with_cache(tokens.to(m.device), [hook], return_logits=False)[1][hook][0, 1:] for m in models]
        inputs = {"both": torch.cat(xs, -1), "A": torch.cat([xs[0], xs[0]], -1), "B": torch.cat([xs[1], xs[1]], -1)}
        row = {}
        for name, x in inputs.items():
            acts = torch.zeros(len(ids))
            acts[known] = sae.encode(x.to(sae.device, sae.dtype))[:, latent].float().cpu()
            row[name] = [round(v, 4) for v in acts.tolist()]
        out.append(row)
    return out


def context(store: Any, index: int, tokenizer: Any, width: int = 10) -> str:
    """The text up to the token at `index` of a store (within its window), that token in [[ ]]."""
    ids = store.token_ids(max(0, index - width + 1), index + 1)
    pos = ids[:, 1]
    start = int((pos[1:] <= pos[:-1]).nonzero()[-1, 0]) + 1 if bool((pos[1:] <= pos[:-1]).any()) else 0
    tokens = ids[start:, 0].tolist()
    return tokenizer.decode(tokens[:-1]) + "[[" + tokenizer.decode(tokens[-1:]) + "]]"
