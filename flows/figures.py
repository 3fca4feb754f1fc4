"""Figures logged with each pipeline run: the per-epoch loss curves of steps 2-3."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (("g_", "generator (Eq. 12 terms)"), ("q_", "quantized model (Eq. 13-14 terms)"),
          ("lr", "learning rate"))


def read_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curves(rows: list[dict]):
    """A matplotlib Figure: one panel per group of history columns (``g_*``, ``q_*``, ``lr*``),
    one line per column over the epochs; a column missing from an epoch leaves a gap."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = [(prefix, title, sorted({k for r in rows for k in r if k.startswith(prefix)
                                      and isinstance(r[k], (int, float))}))
              for prefix, title in PANELS]
    groups = [g for g in groups if g[2]]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 3.6),
                             squeeze=False)
    for ax, (_, title, keys) in zip(axes[0], groups):
        for key in keys:
            pts = [(r["epoch"] + 1, r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
