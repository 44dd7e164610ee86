"""What an experiment keeps of each finished run beyond its final metrics, read from the run's summary.json:
the test metric of every round (curves, and each peer's best round: memorisation shows in the gap between best
and final), the training-set scores (data.train_eval: on the labels trained on and on the clean ones) and the
compute the run spent, counted as it ran."""

from __future__ import annotations

from typing import Any

__all__ = ["compute_of", "curve_of", "enrich_final"]


def curve_of(summary: dict) -> list[dict[str, Any]]:
    """Per evaluated round: its step, each peer's test accuracy and loss, their means and the ensemble's."""
    out = []
    for r in summary.get("rounds", []):
        peers = r.get("peers", {})
        out.append(
            {
                "step": r["step"],
                "peer_accuracy": {n: p.get("test_accuracy") for n, p in peers.items()},
                "peer_loss": {n: p.get("test_loss") for n, p in peers.items()},
                **{k: r.get(k) for k in ("mean_peer_accuracy", "mean_peer_loss", "ensemble_accuracy", "ensemble_loss")},
            }
        )
    return out


def compute_of(summary: dict) -> dict[str, int]:
    """What the run spent, in batches of each peer's own size: optimizer steps, and forward passes while training
    (each step's own, plus one per local teacher a checkpoint-exchange step runs; DML's teacher logits are the
    other peers' own forwards, so they cost none)."""
    peers = summary["peers"]
    steps = [int(p["steps"]) for p in peers]
    teacher = sum(int(p.get("teacher_forwards", 0)) for p in peers)
    return {
        "num_peers": len(peers),
        "steps_per_peer": max(steps),
        "peer_steps": sum(steps),
        "teacher_forwards": teacher,
        "train_forwards": sum(steps) + teacher,
    }


def _best(curve: list[dict], name: str, key: str, lower: bool) -> tuple[float, int] | None:
    points = [(c[key][name], c["step"]) for c in curve if c[key].get(name) is not None]
    if not points:
        return None
    sign = 1 if lower else -1
    value, step = min(points, key=lambda vs: (sign * vs[0], vs[1]))  # the best value; on a tie, the earliest
    return float(value), int(step)


def enrich_final(final: dict, summary: dict) -> dict:
    """The trial's final metrics with: each peer's best round (`peer_best`, `peer_best_step`) and their means
    (`mean_peer_best`, `best_step`), the peers' mean training scores, the curve and the compute."""
    curve = curve_of(summary)
    classification = summary.get("task") == "classification"
    key, lower = ("peer_accuracy", False) if classification else ("peer_loss", True)
    best = {p["name"]: _best(curve, p["name"], key, lower) for p in summary["peers"]}
    found = {n: b for n, b in best.items() if b is not None}
    out = {**final, "curve": curve, "compute": compute_of(summary)}
    if found:
        out["peer_best"] = {n: b[0] for n, b in found.items()}
        out["peer_best_step"] = {n: b[1] for n, b in found.items()}
        out["mean_peer_best"] = sum(b[0] for b in found.values()) / len(found)
        out["best_step"] = sum(b[1] for b in found.values()) / len(found)
    for score in ("train_accuracy", "train_accuracy_clean", "train_set_loss"):
        values = [p[score] for p in summary["peers"] if p.get(score) is not None]
        if values:
            out[f"mean_peer_{score}"] = sum(values) / len(values)
    return out
