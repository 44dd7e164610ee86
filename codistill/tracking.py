"""MLflow tracking (the only module that imports mlflow). Only the driver logs.

One parent run per job: params = the flattened config, metrics = ensemble accuracy, churn, mean
pairwise KL per evaluation step; one nested run per peer with its own metrics (loss, accuracy,
steps/s, staleness, bytes exchanged, restarts); artifacts: the resolved job file, summary.json, a
PNG of accuracy over steps and the final peer weights. Under a Tune sweep each trial's parent run
is itself nested under the sweep's run.

Store: `tracking.uri`, else MLFLOW_TRACKING_URI, else MLflow's own default (sqlite:///mlflow.db in
the working directory), made absolute so that Tune trial processes, which change directory, write
to the same file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from codistill.config import RunConfig, flatten, to_dict
from codistill.engine.report import Reporter, RoundResult, round_record
from codistill.storage import Storage

ROUND_METRICS = ("ensemble_accuracy", "churn", "mean_pairwise_kl", "mean_peer_accuracy")
"""Logged to the job's run per round (the first one is how a resumed driver finds what is logged)."""
PEER_METRICS = (
    "train_loss",
    "test_loss",
    "test_accuracy",
    "steps_per_s",
    "staleness_mean",
    "staleness_max",
    "teacher_lead_max",
    "bytes_published",
    "bytes_pulled",
    "restarts",
    "lr",
)
"""Logged to each peer's run per round."""

__all__ = ["NullTracker", "Tracker", "make_tracker", "plot_curves", "resolve_tracking_uri"]


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    elif "://" not in uri:  # a plain path: a local file store directory
        uri = os.path.abspath(uri)
    return uri


class NullTracker(Reporter):
    """tracking: none."""

    run_id: str | None = None

    def state(self) -> dict | None:
        return None

    def finish(self, summary: dict, out_dir: str, status: str = "FINISHED") -> None:
        pass

    def fail(self, status: str = "FAILED") -> None:
        pass


class Tracker(NullTracker):
    """Logs a run to MLflow through MlflowClient (explicit run ids, no global active-run state)."""

    def __init__(
        self,
        cfg: RunConfig,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        resume: dict | None = None,
        *,
        kind: str = "job",
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        name = cfg.tracking.experiment or cfg.name
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.peer_runs: dict[str, str] = {}
        if resume:  # a resumed driver keeps logging into the runs the first one created
            self.job_run, self.peer_runs = resume["run_id"], dict(resume["peer_runs"])
            self.run_id = self.job_run
            for run_id in [self.job_run, *self.peer_runs.values()]:
                self.client.update_run(run_id, status="RUNNING")
            return
        tags = {"codistill.kind": kind, "codistill.exchange": cfg.exchange.mode}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.job_run = self.client.create_run(self.experiment_id, run_name=run_name or cfg.name, tags=tags).info.run_id
        self.run_id = self.job_run
        self._log_params(self.job_run, flatten(to_dict(cfg)))
        for i in range(cfg.num_peers if kind == "job" else 0):  # now: tracking.json names them before anything fails
            name = cfg.peer_name(i)
            run = self.client.create_run(
                self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.job_run, "codistill.kind": "peer"}
            )
            self.peer_runs[name] = run.info.run_id
            self._log_params(
                run.info.run_id, {"peer.index": i, "peer.name": name, **flatten(to_dict(cfg.peers[i]), "peer")}
            )

    def state(self) -> dict:
        """What a resumed driver needs to continue these runs (kept in the run directory)."""
        return {"uri": self.uri, "run_id": self.job_run, "peer_runs": self.peer_runs}

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _metrics(self, run_id: str, values: dict[str, float | None], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        )

    def on_round(self, result: RoundResult) -> None:
        self.log_round(round_record(result))

    def log_round(self, record: dict) -> None:
        """One round (a summary.json record) as metrics of the job's run and of each peer's run."""
        step = record["step"]
        self._metrics(self.job_run, {k: record[k] for k in ROUND_METRICS}, step)
        for name, p in record["peers"].items():
            self._metrics(self.peer_runs[name], {k: p.get(k) for k in PEER_METRICS}, p["step"])

    def on_resume(self, prior_rounds: list[dict]) -> None:
        """A resumed driver logs the rounds an earlier driver recorded but did not get to log (it may be
        killed between the two)."""
        logged = {m.step for m in self.client.get_metric_history(self.job_run, ROUND_METRICS[0])}
        for record in prior_rounds:
            if record["step"] not in logged:
                self.log_round(record)

    def finish(self, summary: dict, out_dir: str, status: str = "FINISHED") -> None:
        """Log artifacts and close the runs. out_dir is the run directory codistill wrote."""
        storage = Storage(out_dir)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            (t / "summary.json").write_text(json.dumps(summary, indent=2))
            job = storage.read("job.yaml")
            if job is not None:
                (t / "job.yaml").write_bytes(job)
            plot_curves(summary, t / "curves.png")
            for name in ("summary.json", "job.yaml", "curves.png"):
                if (t / name).exists():
                    self.client.log_artifact(self.job_run, str(t / name))
            (t / "peers").mkdir()
            for p in summary["peers"]:
                data = storage.read(f"peers/{p['name']}.pt")
                if data is not None:
                    (t / "peers" / f"{p['name']}.pt").write_bytes(data)
            if any((t / "peers").iterdir()):
                self.client.log_artifacts(self.job_run, str(t / "peers"), artifact_path="peers")
        final = {"test_accuracy_" + p["name"]: p["test_accuracy"] for p in summary["peers"]}
        self._metrics(
            self.job_run,
            {
                **final,
                "final_ensemble_accuracy": summary["ensemble"]["test_accuracy"],
                "final_churn": summary["churn"],
                "restarts": summary["restarts"],
                "bytes_exchanged": summary["bytes_exchanged"],
                "wall_time_s": summary["wall_time_s"],
            },
            summary["rounds"][-1]["step"] if summary["rounds"] else 0,
        )
        for run_id in self.peer_runs.values():
            self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.job_run, status)

    def fail(self, status: str = "FAILED") -> None:
        for run_id in [*self.peer_runs.values(), self.job_run]:
            self.client.set_terminated(run_id, status)


def make_tracker(
    cfg: RunConfig,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    resume: dict | None = None,
    *,
    kind: str = "job",
) -> NullTracker:
    """`kind`: "job" (a run with one nested run per peer) or "sweep" (a Tune sweep's parent run)."""
    if cfg.tracking.backend == "none":
        return NullTracker()
    return Tracker(cfg, parent_run_id, run_name, resume, kind=kind)


def plot_curves(summary: dict, path: Path) -> None:
    """Per-peer and ensemble test accuracy over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    if not rounds:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rounds]
    for name in rounds[-1]["peers"]:
        ax.plot(steps, [r["peers"].get(name, {}).get("test_accuracy") for r in rounds], marker=".", label=name)
    ax.plot(steps, [r["ensemble_accuracy"] for r in rounds], "k--", marker="o", label="ensemble")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{summary['name']}: exchange={summary['exchange']['mode']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
