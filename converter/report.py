"""The report's plots: per-layer compression, and the PARS trials against their budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402

from rankfold.converter.results import LayerRow  # noqa: E402
from rankfold.passes.core import atomic_path  # noqa: E402


def plot_layers(layers: Sequence[LayerRow], path: str | Path, title: str) -> Path:
    """Per-layer MACs before and after (log scale), with each decomposed layer's ranks."""
    names = [row.name for row in layers]
    before = [row.original_macs for row in layers]
    after = [row.macs for row in layers]
    width = max(6.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], before, width=0.4, label="original", color="#9aa5b1")
    ax.bar([p + 0.2 for p in positions], after, width=0.4, label="compressed", color="#2b7bba")
    for p, row in zip(positions, layers):
        if row.rank:
            ax.annotate(
                "×".join(map(str, row.rank)),
                (p + 0.2, row.macs),
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_ylabel("MACs per sample")
    ax.set_xticks(list(positions), names, rotation=90, fontsize=6)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def plot_search(report: Mapping[str, Any], path: str | Path) -> Path:
    """Proxy vs MACs of every trial, the Pareto front, the best trial and the budget."""
    from matplotlib.figure import Figure

    rows = [r for r in report["table"] if r["state"] == "COMPLETE"]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.scatter(
        [r["macs"] / 1e6 for r in rows],
        [r["proxy"] for r in rows],
        s=14,
        color="#9aa5b1",
        label=f"trials ({len(rows)})",
    )
    by_number = {r["trial"]: r for r in rows}
    front = [by_number[n] for n in report["pareto"] if n in by_number]
    ax.plot(
        [r["macs"] / 1e6 for r in front],
        [r["proxy"] for r in front],
        "-o",
        color="#d1495b",
        markersize=4,
        label="Pareto front",
    )
    seeds = [r for r in rows if r.get("seed")]
    if seeds:
        ax.scatter(
            [r["macs"] / 1e6 for r in seeds],
            [r["proxy"] for r in seeds],
            marker="s",
            s=36,
            color="#edae49",
            label="seeded (" + ", ".join(str(r["seed"]) for r in seeds) + ")",
        )
    best = report["best"]
    ax.scatter(
        [best["macs"] / 1e6], [best["proxy"]], marker="*", s=160, color="#2b7bba", label="best"
    )
    ax.axvline(report["budget"]["goal"] / 1e6, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("MACs per sample (millions); dashed: budget")
    ax.set_ylabel(f"proxy ({report['proxy']}, after recalibration)")
    ax.set_title(f"PARS {report['sampler']}: {report['trials_complete']} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)
