"""A Tune sweep's MLflow run: its search space and best parameters, and the truth about trials the
scheduler stopped (their own runs may say FAILED: they were cut off from outside). A resumed sweep does
not log again what its run already holds, and a trial that starts over replaces its cut-off attempt's runs."""

from __future__ import annotations

import json
import re
import time

__all__ = ["close_sweep", "drop_earlier_attempts", "log_report"]


def _not_logged(client, run_id: str, metrics: list) -> list:
    """The metrics whose value the run does not hold yet: a resumed sweep or experiment computes the same
    values again, and MLflow would keep each one twice in its history."""
    held = client.get_run(run_id).data.metrics
    return [m for m in metrics if held.get(m.key) != m.value]


def drop_earlier_attempts(uri: str, parent_run_id: str, run_prefix: str) -> int:
    """Delete the MLflow runs (and their peers' runs) of an earlier attempt of a trial that starts over from step 0:
    a sweep interrupted before the trial's first checkpoint runs it again from the start on --resume, and the
    interrupted attempt's runs (KILLED, a part of the same rounds) would stay beside the new ones. `run_prefix`
    names the trial (`<job>-<trial id>-`); MLflow keeps deleted runs until `mlflow gc`. Returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{parent_run_id}'")
    earlier = [r for r in found if r.data.tags.get("codistill.run_id", "").startswith(run_prefix)]
    for run in earlier:
        peers = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for r in [*peers, run]:
            client.delete_run(r.info.run_id)
    return len(earlier)


def close_sweep(uri: str, run_id: str, job_name: str, out: dict, search: dict) -> None:
    """The sweep's run at its end: FINISHED, or KILLED when the sweep was interrupted (`out["interrupted"]`; a
    --resume finishes it, in the same run)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    params = [Param(f"search.{k}", json.dumps(v)[:6000]) for k, v in search.items()]
    params += [Param(k, str(out[k])) for k in ("metric", "mode")]
    if out.get("best"):
        params += [Param(f"best.{k}", str(v)) for k, v in out["best"]["params"].items()]
        params.append(Param("best.trial", str(out["best"]["trial"])))
    logged = {p for p in client.get_run(run_id).data.params}
    fresh = [p for p in params if p.key not in logged]  # a resumed sweep logged some already
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i : i + 100])
    stopped = {r["trial"] for r in out["trials"] if not r["complete"] and not r["error"]}
    if stopped:
        experiment_id = client.get_run(run_id).info.experiment_id
        for trial_run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"):
            tag = trial_run.data.tags.get("codistill.run_id", "")
            if any(tag.startswith(f"{job_name}-{trial_id}-") for trial_id in stopped):
                peers = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{trial_run.info.run_id}'")
                for r in [trial_run, *peers]:
                    client.set_terminated(r.info.run_id, "KILLED")
    if out.get("best"):
        best = Metric(f"best_{out['metric']}", out["best"]["metric"], int(time.time() * 1000), 0)
        client.log_batch(run_id, metrics=_not_logged(client, run_id, [best]))
        client.log_artifact(run_id, out["best_job"])
    client.set_terminated(run_id, "KILLED" if out.get("interrupted") else "FINISHED")


def _metric_key(*parts: str) -> str:
    """An MLflow metric key from free text (arm labels hold `=` and `,`, which MLflow refuses)."""
    return ".".join(re.sub(r"[^\w\-. /]", "_", p) for p in parts)


def log_report(uri: str, run_id: str, report: dict, files: list) -> None:
    """An experiment's report on its sweep run: the files as artifacts under `report/`, and per arm and
    metric the mean and the paired difference against the baseline, and its compute, as metrics."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for arm in report["arms"]:
        for name, m in arm["metrics"].items():
            if m["spread"]["mean"] is not None:
                metrics.append(Metric(_metric_key(arm["label"], name, "mean"), m["spread"]["mean"], now, 0))
            if m["delta"] is not None and m["delta"]["mean"] is not None:
                metrics.append(Metric(_metric_key(arm["label"], name, "delta"), m["delta"]["mean"], now, 0))
        for key, value in (arm.get("compute") or {}).items():  # what the arm's runs spent (counted by them)
            metrics.append(Metric(_metric_key(arm["label"], "compute", key), float(value), now, 0))
    metrics = _not_logged(client, run_id, metrics)  # a resumed experiment's report: what changed only
    logged = set(client.get_run(run_id).data.params)
    params = [
        Param(k, v[:6000])
        for k, v in (
            ("experiment.varied", ",".join(report["varied"])),
            ("experiment.seeds", json.dumps(report["seeds"])),
            ("experiment.baseline", report["baseline"]),
        )
        if k not in logged
    ]
    for i in range(0, max(len(metrics), len(params)), 100):
        client.log_batch(run_id, metrics=metrics[i : i + 100], params=params[i : i + 100])
    for path in files:
        client.log_artifact(run_id, str(path), "report")
