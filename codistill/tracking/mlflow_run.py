"""A job's MLflow runs: one run for the job, one nested run per peer (Tune: the job's run nested under
the sweep's). Only the driver logs, through MlflowClient with explicit run ids, and every call goes
through `SafeClient`: MLflow failing never stops training.

What a run holds: params = the flattened config; tags = codistill kind, exchange, run id and MLflow's
own source, user and git tags; per round: ensemble metrics (job run), per-peer metrics and the
training loss of every step (`step_loss`, batched per round); system metrics (CPU, memory, GPU) while
it runs; at the end: the dataset as an input, each peer's final model (`mlflow.pytorch.log_model`
with a signature and an input example), job.yaml, summary.json, curves.png and the peers' weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codistill.config import RunConfig, flatten, to_dict
from codistill.engine.report import Reporter, RoundResult, round_record
from codistill.locations import artifact_location, resolve_tracking_uri
from codistill.storage import Storage
from codistill.tracking.plots import plot_curves
from codistill.tracking.safe import SafeClient

__all__ = ["NullTracker", "Tracker", "ROUND_METRICS", "PEER_METRICS", "ModelExample"]

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
)
"""Logged to each peer's run per round."""
MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


class ModelExample:
    """What logging a peer's model needs: how to build it and an input example (a small batch)."""

    def __init__(self, build: Callable[[int], Any], example_input: Any, dataset: Any, dataset_source: str):
        self.build = build  # peer index -> an nn.Module with the peer's architecture
        self.example_input = example_input  # torch.Tensor (2, ...)
        self.dataset = dataset  # codistill.data.Dataset
        self.dataset_source = dataset_source


class NullTracker(Reporter):
    """tracking: none."""

    run_id: str | None = None
    uri: str | None = None

    def state(self) -> dict | None:
        return None

    def finish(self, summary: dict, out_dir: str, example: ModelExample | None = None) -> None:
        pass

    def fail(self, status: str = "FAILED") -> None:
        pass


class Tracker(NullTracker):
    """Logs a run to MLflow (see module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_name: str,
        parent_run_id: str | None = None,
        resume: dict | None = None,
        *,
        kind: str = "job",
        warn: Callable[[str], None] = print,
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking.uri)
        # MLflow's fluent calls (log_model, the system-metrics monitor) write to the process's tracking
        # URI, and setting it also sets MLFLOW_TRACKING_URI, which the next run's default would follow:
        # point it at this run's store while the run lasts and give the program its own back after.
        self._program_uri = _current_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.mlflow = SafeClient(MlflowClient(self.uri), self.uri, warn)
        self.client = self.mlflow.client
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(name, artifact_location=artifact_location(self.uri, name))
        )
        self.peer_runs: dict[str, str] = {}
        self._monitors: list[Any] = []
        if resume:  # a resumed driver keeps logging into the runs the first one created
            self.job_run, self.peer_runs = resume["run_id"], dict(resume["peer_runs"])
            self.run_id = self.job_run
            for run_id in [self.job_run, *self.peer_runs.values()]:
                self.mlflow.call("update_run", run_id, status="RUNNING")
            self._start_system_metrics()
            return
        tags = {
            **_source_tags(),
            "codistill.kind": kind,
            "codistill.exchange": cfg.exchange.mode,
            "codistill.run_id": run_name,
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.job_run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.run_id = self.job_run
        self._log_params(self.job_run, flatten(to_dict(cfg)))
        for i in range(cfg.num_peers if kind == "job" else 0):  # now: tracking.json names them before anything fails
            peer = cfg.peer_name(i)
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{run_name}/{peer}",
                tags={"mlflow.parentRunId": self.job_run, "codistill.kind": "peer", "codistill.peer": peer},
            )
            self.peer_runs[peer] = run.info.run_id
            params = {"peer.index": i, "peer.name": peer, **flatten(to_dict(cfg.peers[i]), "peer")}
            self._log_params(run.info.run_id, params)
        if kind == "job":
            self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU where pynvml is installed) of the driver's machine."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.job_run, sampling_interval=5, samples_before_logging=1)
            monitor.start()
            self._monitors.append(monitor)
        except Exception as e:  # psutil missing or the store refuses: tracking never stops training
            self.mlflow.warn(f"warning: MLflow system metrics are off ({type(e).__name__}: {e})")

    def _stop_system_metrics(self) -> None:
        for monitor in self._monitors:
            with contextlib.suppress(Exception):
                monitor.finish()
        self._monitors = []

    def _restore_tracking_uri(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self._program_uri)  # type: ignore[arg-type]  # None unsets it (typed str only)

    def state(self) -> dict:
        """What a resumed driver needs to continue these runs (kept in the run directory)."""
        return {"uri": self.uri, "run_id": self.job_run, "peer_runs": self.peer_runs}

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.mlflow.call("log_batch", run_id, params=items[i : i + 100])

    def _metrics(self, run_id: str, values: list[tuple[str, float | None, int]]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, step) for k, v, step in values if v is not None]
        for i in range(0, len(metrics), MAX_BATCH):
            self.mlflow.call("log_batch", run_id, metrics=metrics[i : i + MAX_BATCH])

    def on_round(self, result: RoundResult) -> None:
        self.log_round(round_record(result))
        for p in result.peers:  # the training loss of every step, in one batch per round
            first = p.step - len(p.step_losses) + 1
            self._metrics(self.peer_runs[p.name], [("step_loss", v, first + k) for k, v in enumerate(p.step_losses)])

    def log_round(self, record: dict) -> None:
        """One round (a summary.json record) as metrics of the job's run and of each peer's run."""
        step = record["step"]
        self._metrics(self.job_run, [(k, record[k], step) for k in ROUND_METRICS if record.get(k) is not None])
        for name, p in record["peers"].items():
            terms = [(k, v, p["step"]) for k, v in p.get("terms", {}).items()]  # term.<name>, influence_*
            self._metrics(self.peer_runs[name], [(k, p.get(k), p["step"]) for k in PEER_METRICS] + terms)

    def on_resume(self, prior_rounds: list[dict]) -> None:
        """A resumed driver logs the rounds an earlier driver recorded but did not get to log (it may be
        killed between the two)."""
        history = self.mlflow.call("get_metric_history", self.job_run, ROUND_METRICS[0]) or []
        logged = {m.step for m in history}
        for record in prior_rounds:
            if record["step"] not in logged:
                self.log_round(record)

    def finish(self, summary: dict, out_dir: str, example: ModelExample | None = None) -> None:
        """Artifacts, models, the dataset input and final metrics; what failed before is retried first (the
        store may be back) and again at the end, while the artifact files still exist; then the runs close."""
        self._stop_system_metrics()
        self.mlflow.retry()
        storage = Storage(out_dir)
        for p in summary["peers"]:  # where each peer ran: its workers and their nodes (a worker group has several)
            run_id = self.peer_runs.get(p["name"])
            if run_id is not None:
                self.mlflow.call("set_tag", run_id, "codistill.workers", str(p.get("workers", 1)))
                self.mlflow.call("set_tag", run_id, "codistill.node_ids", ",".join(p.get("node_ids") or []))
        with tempfile.TemporaryDirectory() as tmp:
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
                    self.mlflow.call("log_artifact", self.job_run, str(t / name))
            (t / "peers").mkdir()
            for p in summary["peers"]:
                data = storage.read(f"peers/{p['name']}.pt")
                if data is not None:
                    (t / "peers" / f"{p['name']}.pt").write_bytes(data)
            if any((t / "peers").iterdir()):
                self.mlflow.call("log_artifacts", self.job_run, str(t / "peers"), artifact_path="peers")
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
            self._metrics(self.job_run, final)
            if example is not None:
                self._log_inputs_and_models(summary, storage, example)
            if not self.mlflow.retry():
                self.mlflow.warn(
                    f"warning: MLflow ({self.uri}) is still failing: {len(self.mlflow.pending)} calls not logged; "
                    f"summary.json in {out_dir} has every result"
                )
        for run_id in [*self.peer_runs.values(), self.job_run]:
            self.mlflow.call("set_terminated", run_id, "FINISHED")
        self._restore_tracking_uri()

    def _log_inputs_and_models(self, summary: dict, storage: Storage, example: ModelExample) -> None:
        try:
            from codistill.tracking.models import log_dataset, log_peer_model

            log_dataset(self.client, [self.job_run, *self.peer_runs.values()], example)
            for i, p in enumerate(summary["peers"]):
                weights = storage.read_torch(f"peers/{p['name']}.pt")
                if weights is not None:
                    log_peer_model(self.peer_runs[p["name"]], p["name"], example.build(i), weights, example)
        except Exception as e:  # a model that cannot be serialised is a warning, not a lost run
            self.mlflow.warn(f"warning: MLflow could not log the models or the dataset: {type(e).__name__}: {e}")

    def fail(self, status: str = "FAILED") -> None:
        self._stop_system_metrics()
        self.mlflow.retry()
        for run_id in [*self.peer_runs.values(), self.job_run]:
            self.mlflow.call("set_terminated", run_id, status)
        self._restore_tracking_uri()


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
