"""Run a job from Python: `train(cfg, out_dir)` writes the run directory, logs to MLflow and returns
the summary. The CLI (`codistill.run`), Tune trials and notebooks all come through here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from codistill.config import RunConfig, to_dict
from codistill.engine import Reporter, Reporters, build_summary, make_engine
from codistill.engine.preflight import check_job
from codistill.errors import CodistillError, ConfigError
from codistill.rundir import RunLock
from codistill.storage import Storage
from codistill.tracking import make_tracker

__all__ = ["train", "RunFinishedError"]


class RunFinishedError(CodistillError, RuntimeError):
    """--resume of a run that already finished: nothing to do, and nothing is changed."""


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> dict:
    """Run a validated job; write the resolved job and summary.json to out_dir (a path or a pyarrow.fs
    URI) and log it to MLflow (unless tracking is none); return the summary. With resume, continue
    the run whose files are in out_dir. parent_run_id nests the MLflow run (Tune trials).

    Before anything is started or logged, the run directory is locked (one run per directory; a new
    run needs an empty one) and the job's data is loaded and checked."""
    out_dir = str(out_dir)
    storage = Storage(out_dir)
    reporter = reporter or Reporter()
    if resume:
        if storage.read("job.yaml") is None:
            raise ConfigError("--resume", out_dir, "a run directory codistill wrote (it has job.yaml)")
        if storage.read("summary.json") is not None:
            raise RunFinishedError(f"{out_dir} finished already (its summary.json is there): nothing to resume")
    with RunLock(storage, resume=resume) as lock:
        for note in lock.notes:
            reporter.on_event(note)
        dataset = check_job(cfg)
        if not resume:
            storage.write("job.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
        previous = json.loads(storage.read("tracking.json") or b"null") if resume else None
        tracker = make_tracker(cfg, parent_run_id, run_name, resume=previous)
        if tracker.state() is not None:
            storage.write("tracking.json", json.dumps(tracker.state()).encode())
        t0 = time.perf_counter()
        engine = make_engine(cfg, Reporters(tracker, reporter), resume=resume)  # logged before shown
        try:
            history = engine.run(out_dir, dataset)
        except BaseException as e:
            # stopped from outside (a Tune scheduler, Ctrl-C) is KILLED; an error in the run is FAILED
            tracker.fail("FAILED" if isinstance(e, Exception) else "KILLED")
            raise
        summary = build_summary(cfg, history, time.perf_counter() - t0, engine.prior_rounds)
        storage.write("summary.json", json.dumps(summary, indent=2).encode())
        tracker.finish(summary, out_dir)
    if tracker.run_id:
        summary["mlflow_run_id"] = tracker.run_id
    return summary
