"""Figures logged with each pipeline run: the per-epoch loss curves of steps 2-3."""

from __future__ import annotations

import json
from pathlib import Path

COUNTS = {"q_mixed"}  # not a loss: mixed samples per batch (Eq. 9), its own panel
PANELS = (("generator (Eq. 12 terms)", lambda k: k.startswith("g_")),
          ("quantized model (Eq. 13-14 terms)", lambda k: k.startswith("q_") and k not in COUNTS),
          ("mixup: mixed samples per batch", lambda k: k in COUNTS),
          ("learning rate", lambda k: k.startswith("lr")))


def read_history(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curves(rows: list[dict]):
    """A matplotlib Figure: one panel per group of history columns (``g_*`` losses, ``q_*``
    losses, mixed-sample counts, ``lr*``), one line per column over the epochs; a column missing
    from an epoch leaves a gap."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    groups = [(title, sorted({k for r in rows for k in r if wanted(k)
                              and isinstance(r[k], (int, float)) and not isinstance(r[k], bool)}))
              for title, wanted in PANELS]
    groups = [g for g in groups if g[1]]
    fig = Figure(figsize=(5 * max(1, len(groups)), 3.6))
    axes = fig.subplots(1, max(1, len(groups)), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups):
        for key in keys:
            pts = [(r["epoch"] + 1, r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
