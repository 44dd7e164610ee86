"""A job's MLflow runs: one run for the job, one nested run per peer (Tune: the job's run nested under
the sweep's). Only the driver logs, through MlflowClient with explicit run ids, and every call goes
through `SafeClient`: made in order on a worker thread, retried in the background while the store fails,
bounded in time (`tracking.connect_timeout_s`, `tracking.request_timeout_s`): MLflow failing or down
never stops training, nor holds it up. The tracker is one of the run's Reporters: the runs open when the
run starts (`on_start`), take its rounds (`on_resume`, `on_round`) and close at its end (`on_end`, `on_fail`).

What a run holds: params = the flattened config; tags = codistill kind, exchange, run id and MLflow's
own source, user and git tags; per round: ensemble metrics (job run), per-peer metrics and the
training loss of every step (`step_loss`, batched per round); system metrics (CPU, memory, GPU) while
it runs; at the end: the dataset as an input, each peer's final model (`mlflow.pytorch.log_model`
with a signature and an input example; a language model exported as a Hugging Face folder,
`mlflow.transformers.log_model` as a text-generation pipeline), job.yaml, summary.json, curves.png and the
peers' weights.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codistill.config import RunConfig, flatten, to_dict
from codistill.engine.report import Reporter, RoundResult, round_record
from codistill.locations import artifact_location, resolve_tracking_uri
from codistill.storage import Storage
from codistill.tracking.example import ModelExample
from codistill.tracking.plots import plot_curves
from codistill.tracking.round_metrics import ROUND_METRICS, metric_batches, round_values
from codistill.tracking.safe import SafeClient, is_transient

__all__ = ["NullTracker", "Tracker"]


class NullTracker(Reporter):
    """tracking: none: no runs (the summary names no MLflow run)."""

    run_id: str | None = None
    uri: str | None = None

    def state(self) -> dict | None:
        return None


class Tracker(NullTracker):
    """Logs a run to MLflow (see module docstring). The runs open when the run starts (`on_start`; a
    sweep's at once, `open`); every call is queued to `SafeClient`'s worker thread, the runs' creation
    included: the tracker waits `tracking.connect_timeout_s` for the runs to exist, then training goes on
    whether or not the store answered. `run_id` and `state()` are None until the runs exist; once they do
    (at once, or later from the worker) the state is kept in the run directory's tracking.json, where a
    resumed driver's tracker finds the runs to go on in."""

    uri: str

    def __init__(
        self,
        cfg: RunConfig,
        run_name: str,
        parent_run_id: str | None = None,
        *,
        run_dir: str | None = None,
        example: ModelExample | None = None,
        kind: str = "job",
        warn: Callable[[str], None] = print,
    ):
        """`run_dir`: the job's run directory (None for a sweep's run); `example`: what logging the peers'
        models needs (None: no models are logged)."""
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.run_name, self.parent_run_id, self.kind = run_name, parent_run_id, kind
        self.uri = resolve_tracking_uri(cfg.tracking.uri)
        self.run_dir, self.example = run_dir, example
        self.storage = Storage(run_dir) if run_dir is not None else None
        # a resumed driver keeps logging into the runs the first one created (a new run's directory is empty)
        self.previous = json.loads(self.storage.read("tracking.json") or b"null") if self.storage else None
        uri = self.uri
        self.mlflow = SafeClient(
            lambda: MlflowClient(uri), self.uri, warn, request_timeout_s=cfg.tracking.request_timeout_s
        )
        self.experiment_id: str | None = None
        self.job_run: str | None = None
        self.peer_runs: dict[str, str] = {}
        self._monitors: list[Any] = []
        self._ending = False  # the end or a failure began: no system-metrics monitor starts any more
        self._started = False  # open() was called
        self._opened = threading.Event()  # the runs exist
        self._program_uri: str | None = None
        self._prior_rounds: list[dict] = []  # given to on_resume before the runs were opened

    def on_start(self, cfg: RunConfig, total_steps: int) -> None:
        self.open()

    def open(self, *, wait: bool = True) -> None:
        """Queue the runs' creation (a resumed driver's: their status RUNNING again) and wait up to
        `tracking.connect_timeout_s` for them (`wait`); then the earlier rounds of a resumed run (`on_resume`
        came first). Once only."""
        import mlflow

        if self._started:
            return
        self._started = True
        # MLflow's fluent calls (log_model, the system-metrics monitor) write to the process's tracking
        # URI, and setting it also sets MLFLOW_TRACKING_URI, which the next run's default would follow:
        # point it at this run's store while the run lasts and give the program its own back after.
        self._program_uri = _current_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        if self.previous:
            self.job_run, self.peer_runs = self.previous["run_id"], dict(self.previous["peer_runs"])
            self.run_id = self.job_run
            for run_id in [self.job_run, *self.peer_runs.values()]:
                self.mlflow.call("update_run", run_id, status="RUNNING")
            self.mlflow.submit(self._start_system_metrics, "system metrics")
        else:
            self._create_runs(self.uri, self.run_name, self.parent_run_id, self.kind)
        self.mlflow.submit(self._runs_exist, "create_run")
        timeout_s = self.cfg.tracking.connect_timeout_s
        if wait and not self.mlflow.wait_until(self._opened.is_set, timeout_s):
            if self.kind == "sweep":  # the trials start now without a parent run: one made later would stay empty
                self.mlflow.warn_failing(
                    f"warning: MLflow ({self.uri}) did not answer within {timeout_s:g}s: the "
                    f"sweep goes on without its parent run (each trial logs its own runs when the store answers)"
                )
                self.mlflow.close()
            else:
                self.mlflow.warn_failing(
                    f"warning: MLflow ({self.uri}) did not answer within {timeout_s:g}s; "
                    f"training goes on and tracking is retried in the background (summary.json in the run "
                    f"directory stays the record)"
                )
        self.mlflow.say_notes()
        if self._prior_rounds:
            self._log_missing(self._prior_rounds)

    def _create_runs(self, uri: str, run_name: str, parent_run_id: str | None, kind: str) -> None:
        """Queue the creation of the experiment (if new), the job's run and each peer's run, with params."""
        cfg = self.cfg

        def experiment() -> None:
            name = cfg.tracking.experiment or cfg.name
            exp = self.mlflow.client.get_experiment_by_name(name)
            self.experiment_id = (
                exp.experiment_id
                if exp
                else self.mlflow.client.create_experiment(name, artifact_location=artifact_location(uri, name))
            )

        # resolved here, on the caller's thread: MLflow's context providers import IPython, and an import on
        # the worker thread races the main thread's matplotlib (it reads a half-imported IPython module)
        source_tags = _source_tags()

        def job_run() -> None:
            tags = {
                **source_tags,
                "codistill.kind": kind,
                "codistill.exchange": cfg.exchange.mode,
                "codistill.run_id": run_name,
            }
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.mlflow.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.job_run = run.info.run_id

        def peer_run(i: int) -> None:
            peer = cfg.peer_name(i)
            if self.job_run is not None:
                tags = {"mlflow.parentRunId": self.job_run, "codistill.kind": "peer", "codistill.peer": peer}
                run = self.mlflow.client.create_run(self.experiment_id, run_name=f"{run_name}/{peer}", tags=tags)
                self.peer_runs[peer] = run.info.run_id

        self.mlflow.submit(experiment, "get_experiment_by_name")
        self.mlflow.submit(job_run, "create_run")
        self._log_params(None, flatten(to_dict(cfg)))
        for i in range(cfg.num_peers if kind == "job" else 0):  # first: tracking.json names them all
            self.mlflow.submit(functools.partial(peer_run, i), "create_run")
            params = {"peer.index": i, "peer.name": cfg.peer_name(i), **flatten(to_dict(cfg.peers[i]), "peer")}
            self._log_params(cfg.peer_name(i), params)
        if kind == "job":
            self.mlflow.submit(self._start_system_metrics, "system metrics")

    def _runs_exist(self) -> None:
        """Queued after the runs' creation: `run_id` and `state()` hold them now, and tracking.json names
        them (the MLflow runs a resumed driver goes on in)."""
        self.run_id = self.job_run
        self._opened.set()
        state = self.state()
        if state is not None and self.storage is not None:
            try:
                self.storage.write("tracking.json", json.dumps(state).encode())
            except Exception as e:  # the run directory refuses: tracking.json is a convenience for --resume
                self.mlflow.note(f"warning: the MLflow run ids were not kept ({type(e).__name__}: {e})")

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU where pynvml is installed) of the driver's machine."""
        if self._ending or self.job_run is None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.job_run, sampling_interval=5, samples_before_logging=1)
            monitor.start()
            self._monitors.append(monitor)
        except Exception as e:  # psutil missing or the store refuses: tracking never stops training
            self.mlflow.note(f"warning: MLflow system metrics are off ({type(e).__name__}: {e})")

    def _stop_system_metrics(self) -> None:
        """The monitor's thread makes its own calls to the store (MLflow's retries, minutes, when it is
        down): wait for it a bounded time."""
        self._ending = True
        monitors, self._monitors = self._monitors, []
        for monitor in monitors:
            stop = threading.Thread(target=monitor.finish, name="codistill-mlflow-system-metrics", daemon=True)
            stop.start()
            stop.join(self.cfg.tracking.request_timeout_s)

    def _restore_tracking_uri(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self._program_uri)  # type: ignore[arg-type]  # None unsets it (typed str only)

    def state(self) -> dict | None:
        """What a resumed driver needs to continue these runs (kept in the run directory); None until
        they exist."""
        if self.job_run is None:
            return None
        return {"uri": self.uri, "run_id": self.job_run, "peer_runs": dict(self.peer_runs)}

    def _run(self, peer: str | None) -> str | None:
        """The job's run (peer None) or a peer's: its id once created (calls made before run after it)."""
        return self.job_run if peer is None else self.peer_runs.get(peer)

    def _batch(self, peer: str | None, **batch: Any) -> None:
        """Queue a log_batch to the job's run or a peer's (it may not exist yet: the id is read when the
        call is made; a run that could not be created logs nothing)."""

        def log() -> None:
            run_id = self._run(peer)
            if run_id is not None:
                self.mlflow.client.log_batch(run_id, **batch)

        self.mlflow.submit(log, "log_batch")

    def _log_params(self, peer: str | None, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._batch(peer, params=items[i : i + 100])

    def _metrics(self, peer: str | None, values: list[tuple[str, float | None, int]]) -> None:
        for batch in metric_batches(values):
            self._batch(peer, metrics=batch)

    def on_round(self, result: RoundResult) -> None:
        self.log_round(round_record(result))
        for p in result.peers:  # the training loss of every step, in one batch per round
            first = p.step - len(p.step_losses) + 1
            self._metrics(p.name, [("step_loss", v, first + k) for k, v in enumerate(p.step_losses)])

    def log_round(self, record: dict) -> None:
        """One round (a summary.json record) as metrics of the job's run and of each peer's run."""
        for peer, values in round_values(record):
            self._metrics(peer, values)

    def on_resume(self, prior_rounds: list[dict]) -> None:
        """A resumed driver logs the rounds an earlier driver recorded but did not get to log (it may be
        killed between the two): once the runs are open (the engines tell of them before `on_start`)."""
        if self._started:
            self._log_missing(prior_rounds)
        else:
            self._prior_rounds = list(prior_rounds)

    def _log_missing(self, prior_rounds: list[dict]) -> None:
        rounds = [  # timestamped now, as if logged now
            (r["step"], [(peer, metric_batches(values)) for peer, values in round_values(r)]) for r in prior_rounds
        ]

        def log_missing() -> None:
            client = self.mlflow.client
            logged = {m.step for m in client.get_metric_history(self.job_run, ROUND_METRICS[0])}
            for step, runs in rounds:
                if step not in logged:
                    for peer, batches in runs:
                        run_id = self._run(peer)
                        for batch in batches if run_id is not None else []:
                            client.log_batch(run_id, metrics=batch)

        self.mlflow.submit(log_missing, "get_metric_history")

    def on_end(self, summary: dict[str, Any]) -> None:
        """Artifacts, models, the dataset input and final metrics are queued after everything before (the
        store may be back); the tracker waits for them (bounded when the store keeps failing), then the
        runs close."""
        assert self.storage is not None, "a job's tracker has its run directory"
        self.open(wait=False)  # opened by on_start
        storage, example = self.storage, self.example if self.run_id else None  # models: into runs that exist
        self._stop_system_metrics()
        for p in summary["peers"]:  # where each peer ran: its workers and their nodes (a worker group has several)
            self._tag(p["name"], "codistill.workers", str(p.get("workers", 1)))
            self._tag(p["name"], "codistill.node_ids", ",".join(p.get("node_ids") or []))
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:  # a call given up may still read it
            t = Path(tmp)
            (t / "summary.json").write_text(json.dumps(summary, indent=2))
            job = storage.read("job.yaml")
            if job is not None:
                (t / "job.yaml").write_bytes(job)
            plot_curves(summary, t / "curves.png")
            tokenizer = storage.read("tokenizer.json")
            if tokenizer is not None:
                (t / "tokenizer.json").write_bytes(tokenizer)
            for name in ("summary.json", "job.yaml", "curves.png", "tokenizer.json"):
                if (t / name).exists():
                    self._on_job_run("log_artifact", str(t / name))
            (t / "peers").mkdir()
            for p in summary["peers"]:
                data = storage.read(f"peers/{p['name']}.pt")
                if data is not None:
                    (t / "peers" / f"{p['name']}.pt").write_bytes(data)
            if any((t / "peers").iterdir()):
                self._on_job_run("log_artifacts", str(t / "peers"), artifact_path="peers")
            step = summary["rounds"][-1]["step"] if summary["rounds"] else 0
            final = [("test_accuracy_" + p["name"], p["test_accuracy"], step) for p in summary["peers"]]
            final += [
                *[
                    (f"final_ensemble_{k.removeprefix('test_')}", v, step)  # final_ensemble_accuracy, _loss
                    for k, v in summary["ensemble"].items()
                    if v is not None
                ],
                ("final_churn", summary["churn"], step),
                ("restarts", summary["restarts"], step),
                ("bytes_exchanged", summary["bytes_exchanged"], step),
                ("wall_time_s", summary["wall_time_s"], step),
            ]
            self._metrics(None, final)
            if example is not None:
                self._log_inputs_and_models(summary, storage, example)
            self._close_runs("FINISHED", f"summary.json in {self.run_dir} has every result")

    def _tag(self, peer: str, key: str, value: str) -> None:
        def tag() -> None:
            run_id = self._run(peer)
            if run_id is not None:
                self.mlflow.client.set_tag(run_id, key, value)

        self.mlflow.submit(tag, "set_tag")

    def _on_job_run(self, method: str, *args: Any, **kwargs: Any) -> None:
        def call() -> None:
            if self.job_run is not None:
                getattr(self.mlflow.client, method)(self.job_run, *args, **kwargs)

        self.mlflow.submit(call, method)

    def _log_inputs_and_models(self, summary: dict, storage: Storage, example: ModelExample) -> None:
        """The dataset as an input of every run, then each peer's model, one call each (what the store
        does not take is tried again; a model that cannot be serialised is a warning, not a lost run)."""
        from mlflow.exceptions import MlflowException

        from codistill.tracking.models import log_dataset, log_hf_model, log_peer_model

        def store_failing(e: Exception) -> bool:  # the store, for a moment: the call is tried again
            local = isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))  # not the store
            return is_transient(e) and isinstance(e, (MlflowException, OSError)) and not local

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def call() -> None:
                try:
                    fn()
                except Exception as e:
                    if store_failing(e):
                        raise
                    self.mlflow.note(
                        f"warning: MLflow could not log the models or the dataset: {type(e).__name__}: {e}"
                    )

            return call

        def dataset() -> None:
            if self.job_run is not None:
                log_dataset(self.mlflow.client, [self.job_run, *self.peer_runs.values()], example)

        def model(i: int, name: str, export: dict) -> None:
            """A Hugging Face export with the transformers flavour; else (none, or the flavour failed) the
            pytorch flavour, and an export's folder beside it as artifacts (`hf/`)."""
            weights = storage.read_torch(f"peers/{name}.pt")
            run_id = self.peer_runs.get(name)
            if weights is None or run_id is None:
                return
            if not export.get("path"):
                log_peer_model(run_id, name, example.build(i), weights, example)
                return
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
                folder = Path(tmp)
                for file in export.get("files", []):
                    data = storage.read(f"{export['path']}/{file}")
                    if data is not None:
                        (folder / file).write_bytes(data)
                try:
                    log_hf_model(run_id, name, folder)
                    return
                except Exception as e:
                    if store_failing(e):
                        raise
                    self.mlflow.note(
                        f"warning: MLflow could not log peer {name} with mlflow.transformers ({type(e).__name__}: "
                        f"{e}); logged with mlflow.pytorch, its Hugging Face folder as artifacts hf/"
                    )
                log_peer_model(run_id, name, example.build(i), weights, example)
                self.mlflow.client.log_artifacts(run_id, str(folder), artifact_path="hf")

        self.mlflow.submit(guarded(dataset), "log_inputs")
        for i, p in enumerate(summary["peers"]):
            self.mlflow.submit(guarded(functools.partial(model, i, p["name"], p.get("export") or {})), "log_model")

    def _close_runs(self, status: str, record: str) -> None:
        """Queue the runs' end, wait for the queue to empty (giving up on a store that keeps failing for
        connect_timeout_s), say what could not be logged, give the program its tracking URI back."""

        def terminate() -> None:  # the runs that exist by then (tried again whole: ending a run twice is no harm)
            for run_id in [*self.peer_runs.values(), self.job_run]:
                if run_id is not None:
                    self.mlflow.client.set_terminated(run_id, status)

        self.mlflow.submit(terminate, "set_terminated")
        if not self.mlflow.drain(self.cfg.tracking.connect_timeout_s):
            left = self.mlflow.close()
            self.mlflow.warn(f"warning: MLflow ({self.uri}) is still failing: {left} calls not logged; {record}")
        self._restore_tracking_uri()

    def on_fail(self, status: str) -> None:
        """The runs end FAILED or KILLED; a run that stopped before it started leaves them all the same (their
        params say what failed)."""
        self.open(wait=False)
        self._stop_system_metrics()
        self._close_runs(status, "the run directory has what was recorded")


def _current_tracking_uri() -> str | None:
    """The tracking URI this program set (`mlflow.set_tracking_uri` or MLFLOW_TRACKING_URI), None if neither.
    MLflow keeps it in a module global with no public getter that tells "unset" from its default."""
    from mlflow.tracking._tracking_service import utils

    return getattr(utils, "_tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")


def _source_tags() -> dict[str, str]:
    """MLflow's own context tags: mlflow.source.name/type, mlflow.user, mlflow.source.git.commit."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags({}).items()}
    except Exception:
        return {}
