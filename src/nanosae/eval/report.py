"""report.html: one self-contained page (plots embedded as PNG data URIs) for one SAE or a sweep."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot, so no backend is chosen for the caller

from nanosae.io import atomic_write

TABLE_KEYS = (
    "fvu",
    "explained_variance",
    "mse",
    "l0",
    "l0_std",
    "l1",
    "dead_fraction",
    "dense_fraction",
    "cosine_similarity",
    "relative_reconstruction_norm",
    "ce_loss_clean",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "kl_div",
    "tokens",
)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(xlabel: str, ylabel: str, draw: Any, size: tuple[float, float] = (6, 3.2), legend: bool = True) -> str:
    """One plot as a PNG data URI: draw(ax) puts the data in, the rest is shared."""
    fig = Figure(figsize=size)
    ax = fig.subplots()
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


FVU_POSITION_NOTE = (
    "Each point divides the squared error of the tokens at that position by their squared distance "
    "from the mean activation. The headline FVU divides the totals over all tokens instead, so rare "
    "tokens of very large norm, which the SAE reconstructs well, weigh more there and it is lower."
)


def frontier_plot(results: list[dict], names: list[str], key: str, label: str, section: str | None = None) -> str:
    """A metric against L0 per SAE; section: a full-suite section holding the metric (SAEs without it left out)."""
    points = [(r["l0"], (r.get(section) or {}) if section else r, name) for r, name in zip(results, names)]
    points = [(x, values[key], name) for x, values, name in points if key in values]

    def draw(ax: Any) -> None:
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points])
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=6)
        ax.set_xscale("log")

    return _figure("L0", label, draw, size=(5, 3.4), legend=False)


def absorption_plot(results: list[dict], names: list[str]) -> str:
    def draw(ax: Any) -> None:
        width = 0.8 / len(results)
        for i, (r, name) in enumerate(zip(results, names)):
            details = r["absorption"]["details"]
            ax.bar(
                [j + i * width for j in range(len(details))],
                [d["mean_absorption_fraction"] for d in details],
                width=width,
                label=name,
                alpha=0.8,
            )
            ax.set_xticks(range(len(details)), [d["first_letter"] for d in details])

    return _figure("first letter", "absorption fraction", draw, size=(8, 3))


SUITE_ROWS = {
    "absorption": (
        "mean_absorption_fraction_score",
        "mean_full_absorption_score",
        "mean_num_split_features",
        "letters_scored",
        "words",
    ),
    "sparse_probing": (
        "llm_test_accuracy",
        "sae_test_accuracy",
        "llm_top_1_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
        "sae_top_5_test_accuracy",
        "sae_top_20_test_accuracy",
        "tasks",
    ),
    "explanations": ("explanation_score", "explanation_score_std", "latents_scored", "latents"),
}
SUITE_NOTES = {
    "absorption": "First-letter task (Chanin et al. 2024, SAEBench's rules): the share of a letter's direction "
    "that latents other than the letter's main latents carry, on words the letter probe gets right; lower is better.",
    "sparse_probing": "Test accuracy of logistic probes on the dense activations (llm) and on the k SAE latents "
    "whose mean differs most between the classes (sae top k), averaged over the token-level tasks below.",
    "explanations": "Mean detection score (balanced accuracy on held-out active and silent windows) of the "
    "explanations in features.db.",
}


def suite_sections(results: list[dict], names: list[str]) -> str:
    """The full suite's tables and plots (nothing when no result has them)."""
    out = []
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    for section, keys in SUITE_ROWS.items():
        if not any(isinstance(r.get(section), dict) for r in results):
            continue
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th>"
            + "".join(
                f"<td>{_fmt((r.get(section) or {}).get(k, (r.get(section) or {}).get('note', '-')))}</td>"
                for r in results
            )
            + "</tr>"
            for k in keys
        )
        out.append(
            f"<h2>{html.escape(section.replace('_', ' '))}</h2><p class='note'>{html.escape(SUITE_NOTES[section])}</p>"
            f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"
        )
        if section == "absorption" and all("details" in (r.get("absorption") or {}) for r in results):
            out.append(f'<figure><img alt="absorption by letter" src="{absorption_plot(results, names)}"></figure>')
        if section == "sparse_probing":
            for r, name in zip(results, names):
                details = (r.get("sparse_probing") or {}).get("details") or {}
                if not details:
                    continue
                cols = [k for k in next(iter(details.values())) if k.endswith("accuracy") or k == "examples"]
                body = "".join(
                    f"<tr><th>{html.escape(t)}</th>" + "".join(f"<td>{_fmt(d[c])}</td>" for c in cols) + "</tr>"
                    for t, d in details.items()
                )
                out.append(
                    f"<h3>{html.escape(name)}: tasks</h3><table><tr><th>task</th>"
                    + "".join(f"<th>{html.escape(c.removesuffix('_test_accuracy'))}</th>" for c in cols)
                    + f"</tr>{body}</table>"
                )
    if len(results) > 1:
        plots = []
        if sum("mean_absorption_fraction_score" in (r.get("absorption") or {}) for r in results) > 1:
            plots.append(
                (
                    "Absorption vs L0",
                    frontier_plot(
                        results, names, "mean_absorption_fraction_score", "absorption fraction", section="absorption"
                    ),
                )
            )
        if sum("sae_top_1_test_accuracy" in (r.get("sparse_probing") or {}) for r in results) > 1:
            plots.append(
                (
                    "Sparse probing vs L0",
                    frontier_plot(
                        results, names, "sae_top_1_test_accuracy", "top-1 probing accuracy", section="sparse_probing"
                    ),
                )
            )
        out += [
            f'<figure><figcaption>{html.escape(t)}</figcaption><img alt="{html.escape(t)}" src="{src}"></figure>'
            for t, src in plots
        ]
    return "".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if not math.isnan(v) else "nan"
    return html.escape(str(v))


def render(results: list[dict], names: list[str], title: str = "nanosae evaluation") -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for r in results) + "</tr>"
        for k in TABLE_KEYS
    )
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    plots = [("Feature density", density_plot(results, names), "")]
    if any(r.get("l0_std", 0) > 0 for r in results):  # TopK's L0 is k on every token: nothing to plot
        plots.append(("L0 per token", l0_plot(results, names), ""))
    plots.append(("FVU by token position", fvu_position_plot(results, names), FVU_POSITION_NOTE))
    if len(results) > 1:
        plots += [
            ("Sparsity–fidelity frontier: L0 vs FVU", frontier_plot(results, names, "fvu", "FVU"), ""),
            (
                "Sparsity–fidelity frontier: L0 vs CE-loss score",
                frontier_plot(results, names, "ce_loss_score", "CE-loss score"),
                "",
            ),
        ]
    figs = "".join(
        f'<figure><figcaption>{html.escape(t)}</figcaption><img alt="{html.escape(t)}" src="{src}">'
        + (f'<p class="note">{html.escape(note)}</p>' if note else "")
        + "</figure>"
        for t, src, note in plots
    )
    hooks = ", ".join(sorted({html.escape(r["hook"]) for r in results}))
    return page(
        title,
        f"""<p>hook: {hooks}; {results[0]["tokens"]:,} held-out tokens,
{html.escape(results[0]["ablation"])}-ablation baseline.</p><table><tr><th>metric</th>{head}</tr>{rows}</table>{figs}
{suite_sections(results, names)}""",
    )


def page(title: str, body: str) -> str:
    """One self-contained nanosae page (is_report recognises it): the title as heading, then body."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta name="generator" content="nanosae">
<title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#f4f4f4}}
figure{{display:inline-block;margin:1em}}
figcaption{{font-weight:600}}.note{{max-width:36em;font-size:12px;color:#555}}</style></head><body>
<h1>{html.escape(title)}</h1>{body}</body></html>"""


def is_report(path: Path) -> bool:
    """A page write_report made (the only kind of report.html eval replaces)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return b'<meta name="generator" content="nanosae">' in head or b"<title>nanosae evaluation" in head


def write_report(results: list[dict], names: list[str], path: str | Path, title: str = "nanosae evaluation") -> Path:
    page = render(results, names, title)
    return atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
