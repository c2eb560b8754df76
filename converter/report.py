"""report.json and the per-layer compression plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402

from rankfold.passes.core import atomic_path  # noqa: E402


def plot_layers(layers: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Per-layer MACs before and after (log scale), with each decomposed layer's ranks."""
    names = [row["name"] for row in layers]
    before = [row["original_macs"] for row in layers]
    after = [row["macs"] for row in layers]
    width = max(6.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], before, width=0.4, label="original", color="#9aa5b1")
    ax.bar([p + 0.2 for p in positions], after, width=0.4, label="compressed", color="#2b7bba")
    for p, row in zip(positions, layers):
        if row["rank"]:
            ax.annotate(
                "×".join(map(str, row["rank"])),
                (p + 0.2, row["macs"]),
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
