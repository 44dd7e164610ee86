"""The curves PNG logged with every run: per-peer and ensemble test accuracy over steps."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    if not rounds:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
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
    plt.close(fig)
