"""MLflow tracking: the only package that imports mlflow. Only the driver logs.

`make_tracker` gives a `Tracker` (a job's runs; `mlflow_run`) or, with `tracking: none`, a
`NullTracker`. Failures of the store never stop training, and a store that is down or silent never holds
it up (`safe`).
"""

from __future__ import annotations

from collections.abc import Callable

from codistill.config import RunConfig
from codistill.locations import resolve_tracking_uri
from codistill.tracking.example import ModelExample
from codistill.tracking.mlflow_run import NullTracker, Tracker
from codistill.tracking.plots import plot_curves

__all__ = ["make_tracker", "NullTracker", "Tracker", "ModelExample", "plot_curves", "resolve_tracking_uri"]


def make_tracker(
    cfg: RunConfig,
    run_name: str,
    parent_run_id: str | None = None,
    resume: dict | None = None,
    *,
    kind: str = "job",
    warn: Callable[[str], None] = print,
    on_state: Callable[[dict], None] | None = None,
) -> NullTracker:
    """`kind`: "job" (a run with one nested run per peer) or "sweep" (a Tune sweep's parent run).
    `on_state(tracker.state())` once the runs exist: before this returns, or later from the tracker's
    thread when the store did not answer within `tracking.connect_timeout_s`."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    return Tracker(cfg, run_name, parent_run_id, resume, kind=kind, warn=warn, on_state=on_state)
