"""A round as MLflow metrics: which values of a round (a summary.json record) go to the job's run and to
each peer's run, in batches MLflow takes."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ROUND_METRICS", "PEER_METRICS", "MAX_BATCH", "metric_batches", "round_values"]

ROUND_METRICS = (  # those a round has (ensemble_accuracy: classification only)
    "churn",
    "mean_pairwise_kl",
    "mean_peer_accuracy",
    "mean_peer_loss",
    "ensemble_loss",
    "ensemble_accuracy",
)
"""Logged to the job's run per round (the first one is how a resumed driver finds what is logged)."""
PEER_METRICS = (
    "train_loss",
    "test_loss",
    "test_accuracy",
    "train_set_loss",
    "train_accuracy",
    "train_accuracy_clean",
    "perplexity",
    "steps_per_s",
    "samples_per_s",
    "staleness_mean",
    "staleness_max",
    "teacher_lead_max",
    "bytes_published",
    "bytes_pulled",
    "restarts",
    "lr",
    "peak_memory_mb",
)
"""Logged to each peer's run per round."""
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def metric_batches(values: list[tuple[str, float | None, int]]) -> list[list[Any]]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)  # when it happened, not when the store took it
    metrics = [Metric(k, float(v), ts, step) for k, v, step in values if v is not None]
    return [metrics[i : i + MAX_BATCH] for i in range(0, len(metrics), MAX_BATCH)]


def round_values(record: dict) -> list[tuple[str | None, list[tuple[str, float | None, int]]]]:
    """One round (a summary.json record) as (peer, metrics): the job's run (None), then each peer's."""
    step = record["step"]
    out: list[tuple[str | None, list[tuple[str, float | None, int]]]] = [
        (None, [(k, record[k], step) for k in ROUND_METRICS if record.get(k) is not None])
    ]
    for name, p in record["peers"].items():
        terms = [(k, v, p["step"]) for k, v in p.get("terms", {}).items()]  # term.<name>, influence_*
        by_rank = p.get("peak_memory_mb_by_rank") or []
        ranks = [(f"peak_memory_mb.rank{r}", v, p["step"]) for r, v in enumerate(by_rank)] if len(by_rank) > 1 else []
        out.append((name, [(k, p.get(k), p["step"]) for k in PEER_METRICS] + terms + ranks))
    return out
