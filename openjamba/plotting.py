"""Plotting for every figure openjamba writes (loss curves, ablation and benchmark plots): matplotlib on its
file-only backend, imported only when a figure is drawn."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
