"""The curves PNG logged with every run: per-peer and ensemble test accuracy over steps."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(summary: dict, path: Path) -> None:
    """Drawn on a Figure of its own with the Agg canvas, not pyplot: pyplot's global state and
    `matplotlib.use` would change the backend of the program that called `codistill.train` (a notebook)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A canvas reads sys.modules["IPython"].version_info when it is made; another thread may be importing
    # IPython at that moment (half made: AttributeError). Importing it here waits for that import.
    if "IPython" in sys.modules:
        importlib.import_module("IPython")

    rounds = summary["rounds"]
    if not rounds:
        return
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in rounds]
    # classification: accuracies; language models (no ensemble accuracy): losses in nats per token
    peer_key, ensemble_key, label = (
        ("test_accuracy", "ensemble_accuracy", "test accuracy")
        if rounds[-1].get("ensemble_accuracy") is not None
        else ("test_loss", "ensemble_loss", "validation loss (nats/token)")
    )
    for name in rounds[-1]["peers"]:
        ax.plot(steps, [r["peers"].get(name, {}).get(peer_key) for r in rounds], marker=".", label=name)
    ax.plot(steps, [r.get(ensemble_key) for r in rounds], "k--", marker="o", label="ensemble")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{summary['name']}: exchange={summary['exchange']['mode']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
