"""Every chart in one place, with one look. Functions take plain data and a path and write a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"cett": "#1f77b4", "topk": "#ff7f0e", "fat": "#2ca02c", "zero": "#d62728",
          "relu": "#d62728", "silu": "#1f77b4", "gelu": "#2ca02c", "relu2": "#9467bd"}


def _figure(width: float = 6.4, height: float = 4.0):
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
