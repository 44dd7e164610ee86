"""Run a job from Python.

    import codistill
    result = codistill.train("quickstart", steps=60, engine="local", output={"dir": "runs/demo"})
    result.summary["ensemble"], result.run_dir, result.history()    # a pandas frame of the rounds

`train(job, **overrides)` takes a job file, the name of a bundled job or a RunConfig, and overrides
as fields (nested sections as dicts), and returns a `Result`. `run_job(cfg, out_dir, ...)` is what
the CLI and Tune trials call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from codistill.config import RunConfig, to_dict
from codistill.config.overrides import dotted
from codistill.engine import Reporter, Reporters, build_summary, make_engine
from codistill.engine.preflight import check_job
from codistill.errors import CodistillError
from codistill.locations import leave_a_deleted_working_directory
from codistill.run_plan import RunFinishedError, RunPlan, prepare_run
from codistill.rundir import RunLock
from codistill.storage import Storage, checkpoint_path
from codistill.tracking import make_tracker

if TYPE_CHECKING:
    from codistill.data import Dataset

__all__ = ["train", "run_job", "Result", "RunFinishedError", "job_config", "RUN_LOG"]

RUN_LOG = "codistill.log"
"""The run's log file in its directory: full tracebacks of what went wrong (the console shows one line)."""
log = logging.getLogger("codistill")


@dataclass
class Result:
    """What a finished run left: its summary, its directory, its MLflow run."""

    summary: dict
    run_dir: str
    run_id: str
    mlflow_run_id: str | None
    tracking_uri: str | None

    @property
    def peer_weights(self) -> dict[str, str]:
        """Peer name -> its final weights (`torch.load(path, weights_only=True)`)."""
        return {p["name"]: f"{self.run_dir}/peers/{p['name']}.pt" for p in self.summary["peers"]}

    @property
    def checkpoints(self) -> dict[str, list[str]]:
        """Peer name -> the training checkpoints it kept, oldest first."""
        storage = Storage(self.run_dir)
        return {
            p["name"]: [f"{self.run_dir}/{checkpoint_path(p['name'], s)}" for s in storage.checkpoint_steps(p["name"])]
            for p in self.summary["peers"]
        }

    def history(self) -> Any:
        """The rounds as a pandas DataFrame: one row per round and peer (pandas must be installed)."""
        import pandas as pd

        rows = []
        for r in self.summary["rounds"]:
            ensemble = {k: v for k, v in r.items() if k not in ("peers", "events")}
            for name, p in r["peers"].items():
                rows.append({**ensemble, "peer": name, **{f"peer_{k}": v for k, v in p.items()}})
        return pd.DataFrame(rows)


def job_config(job: str | Path | RunConfig | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from a job file, a bundled job's name or a RunConfig, with overrides as fields
    (`steps=60`) and nested sections as dicts (`loss={"alpha": 0}`)."""
    return prepare_run(job, dotted(overrides), job_field="job").config


def train(
    job: str | Path | RunConfig | None = None,
    *,
    reporter: Reporter | None = None,
    resume: bool = False,
    **overrides: Any,
) -> Result:
    """Run a job (see module docstring); with `resume=True`, `job` is the run directory to continue."""
    plan = prepare_run(job, dotted(overrides), resume, job_field="job")
    summary = run_job(plan, reporter=reporter)
    return Result(
        summary,
        plan.run_dir,
        summary.get("run_id", plan.run_id),
        summary.get("mlflow_run_id"),
        summary.get("tracking_uri"),
    )


def _describe_data(dataset: Dataset) -> str:
    meta = dataset.meta
    if meta.get("loader") == "ray_data":
        return f" (decoded from {meta.get('source')} as batches need them: data.loader ray_data)"
    if dataset.task != "causal_lm":
        return ""
    return (
        f" ({meta.get('source')}, {meta.get('num_train_tokens', 0):,} + {meta.get('num_test_tokens', 0):,} tokens, "
        f"tokenizer {meta.get('tokenizer')} with {meta.get('vocab_size')} ids, "
        f"sha256 {str(meta.get('corpus_sha256'))[:12]})"
    )


class _RunLogHandler(logging.FileHandler):
    """DIR/codistill.log. When it cannot be written (a full disk) it goes quiet: the run's own error line says
    what happened, not a `--- Logging error ---` block per record and a traceback from closing the file."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


def _run_log(storage: Storage) -> logging.Handler | None:
    """Tracebacks of this run go to DIR/codistill.log (local run directories only)."""
    if not storage.is_local():
        return None
    handler = _RunLogHandler(f"{storage.root}/{RUN_LOG}")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


_RUN_MODULES = (
    "codistill.engine.peer_actor",
    "codistill.exchange.ray_board",
    "codistill.tracking.models",
    "codistill.tracking.sweep",
    "codistill.engine.resume",
)


def _import_what_a_run_needs() -> None:
    """Import now what the run would import later: under `ray job submit --working-dir`, a second node on
    the same host may unpack the job's package again over the files the driver imports from."""
    import importlib

    for module in _RUN_MODULES:
        importlib.import_module(module)


def run_job(
    plan: RunPlan | RunConfig,
    out_dir: str | Path | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> dict:
    """Run a planned job (codistill.run_plan.prepare_run) and return the summary. Given a RunConfig, the job is
    planned here: into `out_dir` (a path or a pyarrow.fs URI), continuing the run there with `resume`.

    Before anything is started or logged: the run directory is locked (one run per directory; a new
    run needs an empty one) and the job's data is loaded and checked. MLflow failures never stop the
    run; tracebacks go to DIR/codistill.log."""
    if isinstance(plan, RunConfig):
        where = None if out_dir is None else str(out_dir)
        plan = prepare_run(plan, (), resume, run_dir=where, run_name=run_name)
    cfg, out_dir, resume = plan.config, plan.run_dir, plan.resume
    storage = Storage(out_dir)
    reporter = reporter or Reporter()
    _import_what_a_run_needs()
    for note in plan.changes:  # what a resume changes in the recorded job (checked by prepare_run)
        reporter.on_event(f"resume changes {note}")
    with RunLock(storage, resume=resume) as lock:
        handler = _run_log(storage)
        written = resume  # whether the directory holds this run's files yet: a failed start leaves nothing
        try:
            for note in lock.notes:
                reporter.on_event(note)
            run_id = plan.run_id
            t_load = time.perf_counter()
            dataset = check_job(cfg)
            # MLflow (a Reporter): its runs open when the run starts; its model example is made now, while the
            # working directory its data source may name exists
            tracker = make_tracker(cfg, run_id, parent_run_id, run_dir=out_dir, dataset=dataset, warn=reporter.on_event)
            reporter.on_event(
                f"data: {dataset.name}, {len(dataset.train_y)} train / {len(dataset.test_y)} test "
                f"{'sequences' if dataset.task == 'causal_lm' else 'examples'}, loaded and checked in "
                f"{time.perf_counter() - t_load:.1f}s" + _describe_data(dataset)
            )
            if not resume:
                written = True
                storage.write("job.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
                storage.write("run.json", json.dumps({"run_id": run_id}).encode())
                if dataset.meta.get("tokenizer_json"):  # what reloads the trained tokenizer exactly
                    storage.write("tokenizer.json", dataset.meta["tokenizer_json"].encode())
            t0 = time.perf_counter()
            reporters = Reporters(tracker, reporter)  # logged, then shown
            engine = make_engine(cfg, reporters, resume=resume, run_id=run_id)
            try:
                history = engine.run(out_dir, dataset)
            except BaseException as e:
                # stopped from outside (a Tune scheduler, Ctrl-C) is KILLED; an error in the run is FAILED
                reporters.on_fail("FAILED" if isinstance(e, Exception) else "KILLED")
                raise
            summary = build_summary(
                cfg, history, time.perf_counter() - t0, engine.prior_rounds, engine.final, engine.exports
            )
            summary.update(run_id=run_id, run_dir=out_dir, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
            if dataset.meta:  # what text, which tokenizer: two runs can tell they trained on the same
                summary["data"] = {k: v for k, v in dataset.meta.items() if k not in ("tokenizer_json", "stream")}
            storage.write("summary.json", json.dumps(summary, indent=2).encode())
            leave_a_deleted_working_directory()
            reporters.on_end(summary)
            if tracker.run_id != summary["mlflow_run_id"]:  # the store answered only after the run's start wait
                summary.update(mlflow_run_id=tracker.run_id)
                storage.write("summary.json", json.dumps(summary, indent=2).encode())
            return summary
        except CodistillError as e:
            log.error("%s\n%s", e, traceback.format_exc())
            raise
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
            if not written and lock.created:  # a failed start (bad data, a model that does not build)
                with contextlib.suppress(OSError):
                    storage.delete(RUN_LOG)
                lock.release()
                lock.remove_failed_start()
