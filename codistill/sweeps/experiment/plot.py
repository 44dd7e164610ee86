"""The experiment's plot: one panel per metric, each arm's mean with its 95% interval and every seed's value; below,
each arm's test metric against the step (mean over seeds, a band from the lowest to the highest seed)."""

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
    curves = [a for a in report["arms"] if (a.get("curve") or {}).get("points")]
    fig, axes = plt.subplots(
        rows + bool(curves), cols, figsize=(4.2 * cols, 3.2 * (rows + 1.3 * bool(curves))), dpi=100, squeeze=False
    )
    if curves:
        grid = axes[-1, 0].get_gridspec()
        for ax in axes[-1]:
            ax.remove()
        _plot_curves(fig.add_subplot(grid[-1, :]), curves)
        axes = axes[:-1]
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
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path)
    plt.close(fig)
    return True


def _plot_curves(ax, arms: list[dict]) -> None:
    """Each arm's round metric (the mean peer's test accuracy or validation loss) against the step."""
    for i, arm in enumerate(arms):
        points = arm["curve"]["points"]
        steps = [p["step"] for p in points]
        ax.plot(steps, [p["mean"] for p in points], marker="o", ms=3, color=f"C{i}", label=arm["label"])
        ax.fill_between(steps, [p["min"] for p in points], [p["max"] for p in points], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("step")
    note = " (ensemble arm: the ensemble's)" if any(a.get("kind") == "ensemble" for a in arms) else ""
    ax.set_ylabel(arms[0]["curve"]["metric"].replace("_", " ") + note)
    ax.set_title("test metric against the step (mean over seeds; band: lowest to highest seed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(arms)))
