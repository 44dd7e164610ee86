"""The experiment's plot: one panel per metric, each arm's mean with its 95% interval and every seed's value."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["plot_report"]


def plot_report(report: dict, path: Path) -> bool:
    """Writes the PNG; False when there is nothing to plot (no trial finished)."""
    metrics = report["metrics"]
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    labels = [a["label"] for a in report["arms"]]
    xs = list(range(len(labels)))
    for ax, metric in zip(axes.flat, metrics):
        for x, arm in zip(xs, report["arms"]):
            m = arm["metrics"][metric]
            s = m["spread"]
            seeds = [v for v in m["per_seed"].values() if v is not None]
            ax.scatter([x + 0.08] * len(seeds), seeds, s=12, color="0.6", zorder=2)  # beside the interval
            if s["mean"] is None:
                continue
            err = None if s["low"] is None else [[s["mean"] - s["low"]], [s["high"] - s["mean"]]]
            ax.errorbar([x], [s["mean"]], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(xs)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_xticklabels(labels, rotation=20 if max(map(len, labels)) > 8 else 0, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(
        f"{report['job']}: {', '.join(report['varied'])} (mean, 95% CI over seeds {report['seeds']})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
