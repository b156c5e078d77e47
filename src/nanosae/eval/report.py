"""report.html: one self-contained page (plots embedded as PNG data URIs) for one SAE or a sweep."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanosae.io import atomic_write  # noqa: E402

TABLE_KEYS = ("fvu", "explained_variance", "mse", "l0", "l0_std", "l1", "dead_fraction", "dense_fraction",
              "cosine_similarity", "relative_reconstruction_norm", "ce_loss_clean", "ce_loss_with_sae",
              "ce_loss_with_ablation", "ce_loss_score", "kl_div", "tokens")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def density_plot(results: list[dict], names: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for r, name in zip(results, names):
        dens = [math.log10(d) for d in r["feature_density"] if d > 0]
        ax.hist(dens, bins=50, alpha=0.6, label=f"{name} ({r['dead_fraction']:.1%} never fired)")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    return _png(fig)


def l0_plot(results: list[dict], names: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for r, name in zip(results, names):
        ax.bar(range(len(r["l0_histogram"])), r["l0_histogram"], alpha=0.6, label=name, width=1.0)
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=7)
    return _png(fig)


def fvu_position_plot(results: list[dict], names: list[str]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for r, name in zip(results, names):
        pts = [(i, v) for i, v in enumerate(r["fvu_by_position"]) if v is not None]
        ax.plot([p for p, _ in pts], [v for _, v in pts], label=name, lw=1)
    ax.set_xlabel("token position in the window")
    ax.set_ylabel("FVU")
    ax.legend(fontsize=7)
    return _png(fig)


def frontier_plot(results: list[dict], names: list[str], key: str, label: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs, ys = [r["l0"] for r in results], [r[key] for r in results]
    ax.scatter(xs, ys)
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (x, y), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("L0")
    ax.set_ylabel(label)
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if not math.isnan(v) else "nan"
    return html.escape(str(v))


def render(results: list[dict], names: list[str], title: str = "nanosae evaluation") -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for r in results) + "</tr>"
                   for k in TABLE_KEYS)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    plots = [("Feature density", density_plot(results, names)), ("L0 per token", l0_plot(results, names)),
             ("FVU by token position", fvu_position_plot(results, names))]
    if len(results) > 1:
        plots += [("Sparsity–fidelity frontier: L0 vs FVU", frontier_plot(results, names, "fvu", "FVU")),
                  ("Sparsity–fidelity frontier: L0 vs CE-loss score", frontier_plot(results, names, "ce_loss_score", "CE-loss score"))]
    figs = "".join(f'<figure><figcaption>{html.escape(t)}</figcaption><img alt="{html.escape(t)}" src="{src}"></figure>'
                   for t, src in plots)
    hooks = ", ".join(sorted({html.escape(r["hook"]) for r in results}))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}figure{{display:inline-block;margin:1em}}
figcaption{{font-weight:600}}</style></head><body><h1>{html.escape(title)}</h1><p>hook: {hooks}; {results[0]['tokens']:,} held-out tokens,
{html.escape(results[0]['ablation'])}-ablation baseline.</p><table><tr><th>metric</th>{head}</tr>{rows}</table>{figs}</body></html>"""


def write_report(results: list[dict], names: list[str], path: str | Path, title: str = "nanosae evaluation") -> Path:
    page = render(results, names, title)
    return atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
