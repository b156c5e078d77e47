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


def _figure(xlabel: str, ylabel: str, draw: Any, size: tuple[float, float] = (6, 3.2), legend: bool = True) -> str:
    """One plot as a PNG data URI: draw(ax) puts the data in, the rest is shared."""
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=7)
    return _png(fig)


def density_plot(results: list[dict], names: list[str]) -> str:
    def draw(ax: Any) -> None:
        for r, name in zip(results, names):
            dens = [math.log10(d) for d in r["feature_density"] if d > 0]
            ax.hist(dens, bins=50, alpha=0.6, label=f"{name} ({r['dead_fraction']:.1%} never fired)")

    return _figure("log10 feature density (fraction of tokens a latent fires on)", "latents", draw)


def l0_plot(results: list[dict], names: list[str]) -> str:
    def draw(ax: Any) -> None:
        for r, name in zip(results, names):
            ax.bar(range(len(r["l0_histogram"])), r["l0_histogram"], alpha=0.6, label=name, width=1.0)

    return _figure("active latents per token (L0)", "tokens", draw)


def fvu_position_plot(results: list[dict], names: list[str]) -> str:
    def draw(ax: Any) -> None:
        for r, name in zip(results, names):
            pts = [(i, v) for i, v in enumerate(r["fvu_by_position"]) if v is not None]
            ax.plot([p for p, _ in pts], [v for _, v in pts], label=name, lw=1)

    return _figure("token position in the window", "FVU at the position", draw)


FVU_POSITION_NOTE = ("Each point divides the squared error of the tokens at that position by their squared distance "
                     "from the mean activation. The headline FVU divides the totals over all tokens instead, so rare "
                     "tokens of very large norm, which the SAE reconstructs well, weigh more there and it is lower.")


def frontier_plot(results: list[dict], names: list[str], key: str, label: str) -> str:
    def draw(ax: Any) -> None:
        xs, ys = [r["l0"] for r in results], [r[key] for r in results]
        ax.scatter(xs, ys)
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), fontsize=6)
        ax.set_xscale("log")

    return _figure("L0", label, draw, size=(5, 3.4), legend=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if not math.isnan(v) else "nan"
    return html.escape(str(v))


def render(results: list[dict], names: list[str], title: str = "nanosae evaluation") -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for r in results) + "</tr>"
                   for k in TABLE_KEYS)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    plots = [("Feature density", density_plot(results, names), "")]
    if any(r.get("l0_std", 0) > 0 for r in results):  # TopK's L0 is k on every token: nothing to plot
        plots.append(("L0 per token", l0_plot(results, names), ""))
    plots.append(("FVU by token position", fvu_position_plot(results, names), FVU_POSITION_NOTE))
    if len(results) > 1:
        plots += [("Sparsity–fidelity frontier: L0 vs FVU", frontier_plot(results, names, "fvu", "FVU"), ""),
                  ("Sparsity–fidelity frontier: L0 vs CE-loss score",
                   frontier_plot(results, names, "ce_loss_score", "CE-loss score"), "")]
    figs = "".join(f'<figure><figcaption>{html.escape(t)}</figcaption><img alt="{html.escape(t)}" src="{src}">'
                   + (f'<p class="note">{html.escape(note)}</p>' if note else "") + "</figure>" for t, src, note in plots)
    hooks = ", ".join(sorted({html.escape(r["hook"]) for r in results}))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}figure{{display:inline-block;margin:1em}}
figcaption{{font-weight:600}}.note{{max-width:36em;font-size:12px;color:#555}}</style></head><body><h1>{html.escape(title)}</h1><p>hook: {hooks}; {results[0]['tokens']:,} held-out tokens,
{html.escape(results[0]['ablation'])}-ablation baseline.</p><table><tr><th>metric</th>{head}</tr>{rows}</table>{figs}</body></html>"""


def write_report(results: list[dict], names: list[str], path: str | Path, title: str = "nanosae evaluation") -> Path:
    page = render(results, names, title)
    return atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
