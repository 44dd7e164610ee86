"""MLflow tracking: the only package that imports mlflow. Only the driver logs.

`make_tracker` gives a `Tracker` (a job's runs, a Reporter: `mlflow_run`) or, with `tracking: none`, a
`NullTracker`. Failures of the store never stop training, and a store that is down or silent never holds
it up (`safe`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from codistill.config import RunConfig
from codistill.locations import resolve_tracking_uri
from codistill.tracking.example import ModelExample, model_example
from codistill.tracking.mlflow_run import NullTracker, Tracker
from codistill.tracking.plots import plot_curves

__all__ = ["make_tracker", "NullTracker", "Tracker", "ModelExample", "plot_curves", "resolve_tracking_uri"]


def make_tracker(
    cfg: RunConfig,
    run_name: str,
    parent_run_id: str | None = None,
    *,
    run_dir: str | None = None,
    dataset: Any = None,
    kind: str = "job",
    warn: Callable[[str], None] = print,
) -> NullTracker:
    """`kind`: "job" (a run with one nested run per peer, in `run_dir`, whose tracking.json names them for a
    resumed driver; with `dataset`, the peers' models are logged at the end) or "sweep" (a Tune sweep's parent
    run). A job's runs open when it starts (the tracker is its Reporter), a sweep's before this returns (the
    trials need its id); either waits up to `tracking.connect_timeout_s` for the store."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    example = model_example(cfg, dataset) if dataset is not None else None
    tracker = Tracker(cfg, run_name, parent_run_id, run_dir=run_dir, example=example, kind=kind, warn=warn)
    if kind == "sweep":
        tracker.open()
    return tracker
